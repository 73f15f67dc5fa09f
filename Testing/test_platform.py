"""The shared platform: backbone registry, method registry and config source, the trainer, the registration
cache, model folders (format 2 and the older format 1), and the registry-driven command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from atlasseg.atlas import load_atlas_set
from atlasseg.cache import CacheError, RegistrationCache
from atlasseg.cli import main
from atlasseg.config import dataclass_from
from atlasseg.dlf.networks import DLFConfig
from atlasseg.dlf.networks import build_model as build_dlf
from atlasseg.io import Geometry, labels_to_tensor
from atlasseg.methods import METHODS, config_classes, fusion_method_names, implementation, method_names
from atlasseg.model_io import ModelFolderError, load_model
from atlasseg.networks import BACKBONES, BackboneSpec, build_backbone
from atlasseg.phantom import make_phantom, make_phantom_atlas_set
from atlasseg.registration import register, warp_image, warp_labels
from atlasseg.segmenter import SegmenterConfig, train_segmenter
from atlasseg.training import TrainConfig

DATA = Path(__file__).parent / "data"
PHANTOM = {"shape": (24, 24, 24), "spacing": (1.5, 1.5, 1.5), "deformation_mm": 4.0}


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    return load_atlas_set(make_phantom_atlas_set(tmp_path_factory.mktemp("platform") / "atlases", n_cases=6, seed=3,
                                                 **PHANTOM))


# ---------------------------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_keeps_odd_sizes_and_passes_gradients(name):
    torch.manual_seed(0)
    net = build_backbone(BackboneSpec(name, "cpu"), 2, 3)
    x = torch.randn(1, 2, 9, 21, 13)
    out = net.train()(x)
    heads = out if isinstance(out, list) else [out]
    extra = getattr(net, "boundary_channels", 0)
    assert heads[0].shape == (1, 3 + extra, 9, 21, 13)
    heads[0].square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and float(sum(g.abs().sum() for g in grads)) > 0
    assert all(len(d) == 3 for d in [net.size_divisor])
    assert BACKBONES[name].presets and BACKBONES[name].reference


def test_backbone_specs_resolve_presets_and_reject_unknowns():
    spec = BackboneSpec("unet", "cpu", {"norm": "batch"})
    assert spec.to_dict() == {"name": "unet", "preset": "cpu", "kwargs": {"channels": [16, 32, 64, 128],
                                                                          "norm": "batch"}}
    assert BackboneSpec.from_dict(spec.to_dict()).resolved_kwargs() == spec.resolved_kwargs()
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        BackboneSpec("nope")
    with pytest.raises(ValueError, match="presets"):
        BackboneSpec("vnet", "huge")
    with pytest.raises(ValueError, match="bad arguments"):
        build_backbone(BackboneSpec("segresnet", kwargs={"channels": [1, 2]}), 1, 2)


def test_the_default_dlf_subnets_are_the_unet_backbone_with_unchanged_parameter_names():
    """A format-1 DLF state dict loads into today's model (the U-Net subclasses MONAI DynUNet unchanged)."""
    model = build_dlf(DLFConfig(n_labels=3, vote_channels=(4, 8, 16), finetune_channels=(4, 8, 16, 32)))
    assert type(model.vote_net).backbone_name == "unet"
    names = set(model.state_dict())
    assert "vote_net.input_block.conv1.conv.weight" in names
    assert "finetune_net.deep_supervision_heads.0.conv.conv.weight" in names
    # an untrained default DLF votes uniformly: its output layers start at zero
    assert all(float(layer.weight.detach().abs().sum()) == 0 for layer in model.vote_net.output_layers())


def test_dlf_takes_any_backbone_by_name(phantom_set, tmp_path):
    arch = DLFConfig(n_labels=5, vote_channels=(4, 8, 16), finetune_channels=(4, 8, 16),
                     finetune_backbone={"name": "segresnet", "preset": "cpu", "kwargs": {"init_filters": 4}})
    model = build_dlf(arch).train()
    assert type(model.finetune_net).backbone_name == "segresnet"
    out = model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 2, 1, 16, 16, 16), torch.randint(0, 5, (1, 2, 16, 16, 16)))
    assert out.logits.shape == (1, 5, 16, 16, 16) and out.deep_supervision == []
    assert DLFConfig.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError, match="unknown backbone"):
        DLFConfig(n_labels=3, vote_backbone={"name": "resnet50"})


# ---------------------------------------------------------------------------------------------------------------
# method registry and configs


def test_registry_lists_every_method_and_its_config_and_implementation():
    assert method_names() == ["majority", "weighted", "jlf", "staple", "dlf", "atlasnet", "segmenter", "deepatlas"]
    assert fusion_method_names() == ["majority", "weighted", "jlf", "staple"]
    for name in method_names(trains=True):
        architecture, training = config_classes(name)
        assert issubclass(training, TrainConfig) and "n_labels" in architecture.__dataclass_fields__
        module = implementation(name)
        assert callable(module.train_method) and callable(module.segment_method) and callable(module.build_model)
    assert not METHODS["segmenter"].uses_atlases and METHODS["dlf"].uses_atlases


def test_the_registry_imports_nothing_heavy():
    code = "import sys, atlasseg.methods; print(sorted(m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_configs_are_read_from_nested_dicts_and_reject_unknown_keys():
    cfg = dataclass_from(TrainConfig, {"epochs": 3, "augment": {"flip_prob": 0.0}}, {"learning_rate": 1e-3})
    assert cfg.epochs == 3 and cfg.augment.flip_prob == 0.0 and cfg.learning_rate == 1e-3
    assert cfg.augment.spatial_prob == TrainConfig().augment.spatial_prob       # defaults written once
    with pytest.raises(ValueError, match="unknown setting.*'epoch'"):
        dataclass_from(TrainConfig, {"epoch": 3})
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="dice")


# ---------------------------------------------------------------------------------------------------------------
# trainer


def test_trainer_resumes_mid_run_with_an_identical_history(phantom_set, tmp_path):
    arch = SegmenterConfig(5, 1, "unet", None, {"channels": [4, 8, 16]})
    cfg = dict(patch_size=(16, 16, 16), val_fraction=0.2, learning_rate=2e-3)
    straight = train_segmenter(phantom_set, tmp_path / "straight", arch, TrainConfig(epochs=3, **cfg), "cpu",
                               log=lambda m: None, show_progress=False)

    def interrupt_in_epoch_2(message: str) -> None:     # stops the run before epoch 2 is saved
        if message.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(phantom_set, tmp_path / "resumed", arch, TrainConfig(epochs=3, **cfg), "cpu",
                        log=interrupt_in_epoch_2, show_progress=False)
    resumed = train_segmenter(phantom_set, tmp_path / "resumed", arch, TrainConfig(epochs=3, **cfg), "cpu",
                              resume=True, log=lambda m: None, show_progress=False)
    assert resumed.epochs_run == 2 and len(resumed.history) == 3
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and (a["val_dice"] == b["val_dice"])
    assert straight.history[-1]["train_loss"] < straight.history[0]["train_loss"]
    assert straight.peak_rss_gib > 0.1
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["format"] == "atlasseg-model" and config["version"] == 2 and config["method"] == "segmenter"
    assert config["backbones"]["segmenter"] == {"name": "unet", "preset": None, "kwargs": {"channels": [4, 8, 16]}}


# ---------------------------------------------------------------------------------------------------------------
# registration cache


def test_cache_round_trips_both_directions_and_the_fields_exactly(phantom_set, tmp_path):
    fixed_id, moving_ids = "phantom_000", ["phantom_001", "phantom_002"]
    cache = RegistrationCache(tmp_path / "cache", phantom_set, "torch", "fast", "cpu")
    assert cache.ensure({fixed_id: moving_ids}, parts=("warped", "inverse", "fields")) == 2
    fixed = phantom_set.load(fixed_id)
    movings = [phantom_set.load(m) for m in moving_ids]
    regs = register(fixed.images, [m.images for m in movings], backend="torch", device="cpu", preset="fast")
    reopened = RegistrationCache(tmp_path / "cache", phantom_set, "torch", "fast", "cpu")
    assert reopened.ensure({fixed_id: moving_ids}, parts=("warped", "inverse", "fields")) == 0
    case = reopened.load(fixed_id, moving_ids)
    values = torch.tensor(phantom_set.label_values)
    from atlasseg.registration import normalized_tensor

    for k, (moving, reg) in enumerate(zip(movings, regs)):
        g_fixed, g_moving = Geometry.of(fixed.images[0]), Geometry.of(moving.images[0])
        assert torch.equal(case.atlas_images[k], warp_image(normalized_tensor(moving.images), g_moving, reg.forward))
        assert torch.equal(values[case.atlas_labels[k]], warp_labels(labels_to_tensor(moving.label), g_moving,
                                                                     reg.forward, phantom_set.label_values))
        image, label = reopened.load_inverse(fixed_id, moving.case_id)
        assert torch.equal(image, warp_image(normalized_tensor(fixed.images), g_fixed, reg.inverse))
        assert torch.equal(values[label], warp_labels(labels_to_tensor(fixed.label), g_fixed, reg.inverse,
                                                      phantom_set.label_values))
        assert image.shape[1:] == g_moving.shape                   # the inverse direction lives on the atlas grid
        cached = reopened.registration(fixed_id, moving.case_id)
        assert torch.equal(cached.forward.field, reg.forward.field)
        assert torch.equal(cached.inverse.field, reg.inverse.field)
        assert cached.forward.geometry == g_fixed and cached.inverse.geometry == g_moving
    # a part asked for later is added from a new registration; the parts there stay as they were
    other = RegistrationCache(tmp_path / "cache2", phantom_set, "torch", "fast", "cpu")
    other.ensure({fixed_id: moving_ids})
    with pytest.raises(CacheError, match="no cached 'inverse' part"):
        other.load_inverse(fixed_id, moving_ids[0])
    assert other.ensure({fixed_id: moving_ids}, parts=("inverse",)) == 2
    assert torch.equal(other.load(fixed_id, moving_ids).atlas_images, case.atlas_images)
    assert torch.equal(other.load_inverse(fixed_id, moving_ids[1])[0], reopened.load_inverse(fixed_id,
                                                                                            moving_ids[1])[0])


def test_cache_refuses_other_settings_and_damaged_files(phantom_set, tmp_path):
    cache = RegistrationCache(tmp_path / "cache", phantom_set, "torch", "affine", "cpu")
    cache.ensure({"phantom_000": ["phantom_001"]})
    with pytest.raises(CacheError, match="preset"):
        RegistrationCache(tmp_path / "cache", phantom_set, "torch", "fast", "cpu")
    with pytest.raises(CacheError, match="settings"):
        RegistrationCache(tmp_path / "cache", phantom_set, "torch", "affine", "cpu", settings={"lncc_radius": 3})
    pair = next((tmp_path / "cache" / "pairs").rglob("*.safetensors"))
    pair.write_bytes(pair.read_bytes()[:100])
    with pytest.raises(CacheError, match="checksum"):
        RegistrationCache(tmp_path / "cache", phantom_set, "torch", "affine", "cpu").load("phantom_000",
                                                                                          ["phantom_001"])


# ---------------------------------------------------------------------------------------------------------------
# model folders of format 1


@pytest.mark.parametrize("kind", ["dlf", "unet"])
def test_format_1_model_folders_load_and_predict_as_before(kind):
    """Folders written before the registry (DLF and its plain U-Net, ``kind="unet"``) load as the 'dlf' and
    'segmenter' methods and give the logits the old code gave (saved beside them)."""
    loaded = load_model(DATA / f"format1_{kind}")
    assert loaded.method == ("dlf" if kind == "dlf" else "segmenter")
    assert loaded.config["loaded_from_format"] == "atlasseg-dlf-model/1"
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 16, 16, 16, generator=gen)
    atlases = torch.rand(1, 2, 1, 16, 16, 16, generator=gen)
    labels = torch.randint(0, 3, (1, 2, 16, 16, 16), generator=gen)
    with torch.no_grad():
        logits = loaded.model(target, atlases, labels).logits if kind == "dlf" else loaded.model(target)[0]
    expected = load_file(str(DATA / "format1_expected.safetensors"))[f"{kind}_logits"]
    assert torch.allclose(logits[0], expected, atol=1e-5)


def test_wrong_method_and_unknown_format_versions_are_named(tmp_path):
    with pytest.raises(ModelFolderError, match="a 'segmenter' model, not a 'dlf' model"):
        load_model(DATA / "format1_unet", method="dlf")
    folder = tmp_path / "future"
    folder.mkdir()
    config = json.loads((DATA / "format1_dlf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "version": 7}))
    with pytest.raises(ModelFolderError, match="atlasseg-dlf-model version 7 is not supported"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format": "atlasseg-model", "version": 3}))
    with pytest.raises(ModelFolderError, match="atlasseg-model version 3 is not supported"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------------------------
# registry-driven command line


def test_train_print_config_merges_defaults_file_and_flags(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"method": "segmenter", "architecture": {"backbone": "vnet"},
                                  "training": {"epochs": 7, "augment": {"flip_prob": 0.0}}}))
    assert main(["train", "--config", str(config), "--epochs", "9", "--backbone-preset", "paper",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "segmenter"
    assert printed["architecture"]["backbone"] == "vnet" and printed["architecture"]["backbone_preset"] == "paper"
    assert printed["training"]["epochs"] == 9 and printed["training"]["augment"]["flip_prob"] == 0.0
    assert printed["training"]["learning_rate"] == TrainConfig().learning_rate
    assert main(["dlf-train", "--print-config", "--lr", "0.01", "--no-finetune"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "dlf" and printed["training"]["learning_rate"] == 0.01
    assert printed["architecture"]["use_finetune"] is False
    assert main(["train", "--print-config"]) == 2
    assert "--method is required" in capsys.readouterr().err
    config.write_text(json.dumps({"method": "segmenter", "training": {"epoch": 7}}))
    assert main(["train", "--config", str(config), "--print-config"]) == 2
    assert "unknown setting(s) ['epoch']" in capsys.readouterr().err


def test_train_and_segment_any_registered_method_end_to_end(phantom_set, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["train", "--method", "segmenter", "--atlases", str(phantom_set.root), "--output", str(model),
                 "--backbone", "segnet", "--backbone-kwargs", '{"channels": [4, 8], "convs": [1, 1]}',
                 "--epochs", "2", "--patch-size", "16", "16", "16", "--val-fraction", "0.2", "--device", "cpu",
                 "--quiet"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["method"] == "segmenter" and config["backbones"]["segmenter"]["name"] == "segnet"
    assert config["architecture"]["backbone_kwargs"] == {"channels": [4, 8], "convs": [1, 1]}
    image, _ = make_phantom(seed=99, **PHANTOM)
    image.SetOrigin((3.0, -2.0, 5.0))
    target = tmp_path / "target.nii.gz"
    sitk.WriteImage(image, str(target))
    out = tmp_path / "out"
    assert main(["segment", "--method", "segmenter", "--model", str(model), "--target", str(target), "--atlases",
                 str(phantom_set.root), "--output", str(out), "--maps", "--device", "cpu", "--quiet"]) == 0
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert Geometry.of(seg) == Geometry.of(image)
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= set(phantom_set.label_values)
    assert len(list((out / "maps").glob("probability_*.nii.gz"))) == len(phantom_set.label_values)
    capsys.readouterr()
    assert main(["segment", "--method", "dlf", "--model", str(model), "--target", str(target), "--atlases",
                 str(phantom_set.root), "--output", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "a 'segmenter' model, not a 'dlf' model" in capsys.readouterr().err


def test_a_dlf_cache_of_format_1_is_read_and_extended(tmp_path):
    """A registration cache written by DLF before this module (kept in Testing/data) loads as the 'warped' part,
    equal to what this code computes for the same pairs, and takes new parts without changing the old ones."""
    import shutil

    atlas_set = load_atlas_set(make_phantom_atlas_set(tmp_path / "atlases", n_cases=3, seed=8, shape=(16, 16, 16),
                                                      spacing=(2.0, 2.0, 2.0), deformation_mm=3.0))
    shutil.copytree(DATA / "format1_cache", tmp_path / "old")
    pairs = {"phantom_000": ["phantom_001", "phantom_002"]}
    old = RegistrationCache(tmp_path / "old", atlas_set, "torch", "affine", "cpu")
    assert old.ensure(pairs) == 0                               # everything is there already
    fresh = RegistrationCache(tmp_path / "new", atlas_set, "torch", "affine", "cpu")
    fresh.ensure(pairs)
    a, b = old.load("phantom_000", pairs["phantom_000"]), fresh.load("phantom_000", pairs["phantom_000"])
    assert torch.equal(a.target, b.target) and torch.equal(a.label, b.label)
    assert torch.equal(a.atlas_images, b.atlas_images) and torch.equal(a.atlas_labels, b.atlas_labels)
    assert old.ensure(pairs, parts=("fields",)) == 2
    again = RegistrationCache(tmp_path / "old", atlas_set, "torch", "affine", "cpu")
    assert torch.equal(again.load("phantom_000", pairs["phantom_000"]).atlas_images, a.atlas_images)
    assert again.registration("phantom_000", "phantom_001").forward.field.shape == (3, 16, 16, 16)
