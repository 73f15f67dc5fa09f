"""Deep Label Fusion: shapes, masking, exact reduction to majority voting, training on phantoms (loss, validation
Dice, held-out targets against majority voting), resume, model-folder errors, and the CLI end to end."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from atlasseg.atlas import load_atlas_set
from atlasseg.cli import main
from atlasseg.dlf.inference import predict, prediction_region, segment_dlf
from atlasseg.dlf.networks import DeepLabelFusion, DLFConfig, atlas_union_mask, onehot
from atlasseg.dlf.train import TrainConfig, TrainingError, dice_per_label, train
from atlasseg.fusion import fuse
from atlasseg.model_io import ModelFolderError, check_compatible, load_model
from atlasseg.phantom import make_phantom, make_phantom_atlas_set
from atlasseg.segmenter import SegmenterConfig, train_segmenter
from atlasseg.training import draw_atlases

TINY = {"vote_channels": (4, 8, 16), "finetune_channels": (4, 8, 16, 32)}
PHANTOM = {"shape": (32, 32, 32), "spacing": (1.5, 1.5, 1.5), "deformation_mm": 5.0}
PATCH = (24, 24, 24)


def tiny_training(epochs: int, **kw) -> TrainConfig:
    settings = dict(epochs=epochs, n_atlases=4, patch_size=PATCH, val_fraction=0.2, preset="affine",
                    learning_rate=2e-3, candidates_per_target=5)
    settings.update(kw)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    folder = make_phantom_atlas_set(tmp_path_factory.mktemp("dlf") / "atlases", n_cases=10, seed=5, **PHANTOM)
    return load_atlas_set(folder)


@pytest.fixture(scope="module")
def trained(phantom_set, tmp_path_factory):
    """A run interrupted after 2 epochs (its weights kept), then resumed to 8."""
    work = tmp_path_factory.mktemp("dlf_run")
    out, cache = work / "model", work / "cache"
    arch = DLFConfig(n_labels=5, **TINY)
    messages: list[str] = []
    first = train(phantom_set, out, arch, tiny_training(2), cache, "cpu", log=messages.append, show_progress=False)
    interrupted = {"history": first.history}
    shutil.copytree(out, work / "after_2_epochs", ignore=shutil.ignore_patterns("registration_cache"))
    result = train(phantom_set, out, arch, tiny_training(8), cache, "cpu", resume=True, log=messages.append,
                   show_progress=False)
    return {"folder": out, "cache": cache, "result": result, "interrupted": interrupted, "messages": messages,
            "snapshot": work / "after_2_epochs"}


# ---------------------------------------------------------------------------------------------------------------
# network


def test_shapes_nonnegative_weights_and_deep_supervision():
    torch.manual_seed(0)
    config = DLFConfig(n_labels=4, n_modalities=2, **TINY)
    model = DeepLabelFusion(config)
    for p in model.parameters():  # leave the zero-initialised start so outputs vary
        torch.nn.init.normal_(p, std=0.1)
    b, n, shape = 2, 3, (16, 16, 16)
    target, atlases = torch.rand(b, 2, *shape), torch.rand(b, n, 2, *shape)
    labels = torch.randint(0, 4, (b, n, *shape))
    out = model.train()(target, atlases, labels)
    assert out.logits.shape == (b, 4, *shape)
    assert out.initial.shape == out.votes.shape == (b, 4, *shape)
    assert out.weights.shape == (b, n, 4, *shape) and float(out.weights.detach().min()) >= 0
    assert torch.allclose(out.initial.sum(1), torch.ones(b, *shape), atol=1e-5)
    assert len(out.deep_supervision) == 2 and all(h.shape == out.logits.shape for h in out.deep_supervision)
    eval_out = model.eval()(target, atlases, labels)
    assert eval_out.deep_supervision == [] and eval_out.logits.shape == (b, 4, *shape)


def test_masking_keeps_the_union_and_dilates_by_at_most_one_voxel():
    shape = (16, 16, 16)
    labels = torch.zeros(1, 2, *shape, dtype=torch.int64)
    labels[0, 0, 4:7, 4:7, 4:7] = 2          # label 2 only in a 3^3 cube of one atlas
    labels[0, 1, 5, 5, 5] = 1                # label 1 in one voxel of the other
    mask = atlas_union_mask(onehot(labels, 3))[0]
    union = onehot(labels, 3).amax(1)[0] > 0
    dilated = F.max_pool3d(union.float()[None], 3, stride=1, padding=1)[0] > 0
    assert bool((mask >= union).all()) and bool((mask <= dilated).all())
    assert int(mask[2].sum()) > 27 and int(mask[2].sum()) < int(dilated[2].sum())   # slightly dilated
    assert int(mask[1].sum()) == 1            # a lone voxel is kept, not grown

    torch.manual_seed(1)
    for use_mask in (True, False):
        model = DeepLabelFusion(DLFConfig(n_labels=3, use_mask=use_mask, **TINY))
        for p in model.finetune_net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        probs = torch.softmax(model.eval()(torch.rand(1, 1, *shape), torch.rand(1, 2, 1, *shape), labels).logits, 1)
        outside = probs[0, 2][~mask[2]]
        if use_mask:
            assert float(outside.detach().max()) < 1e-10
        else:
            assert float(outside.detach().max()) > 1e-6


def test_with_both_subnets_off_dlf_is_exactly_majority_voting(phantom_set):
    config = DLFConfig(n_labels=5, use_weighted_voting=False, use_finetune=False, **TINY)
    model = DeepLabelFusion(config).eval()
    gen = torch.Generator().manual_seed(3)
    shape = (20, 27, 23)                      # not a multiple of the window: exercises padding and blending
    labels = torch.randint(0, 5, (4, *shape), generator=gen)        # 4 atlases: many ties
    target, images = torch.rand(1, *shape), torch.rand(4, 1, *shape)
    pred = predict(model, target, images, labels, roi_size=(16, 16, 16), overlap=0.5, device="cpu")
    majority = fuse("majority", None, None, labels, [0, 1, 2, 3, 4])
    assert torch.equal(pred.segmentation_index, majority.segmentation)
    assert torch.equal(pred.initial_index, majority.segmentation)
    assert torch.allclose(pred.initial, majority.posteriors, atol=1e-6)
    # real warped phantoms through the whole path (registration, windows, mask)
    target_image, _ = make_phantom(seed=4242, **PHANTOM)
    from atlasseg.pipeline import prepare

    prepared = prepare([target_image], phantom_set, n_atlases=3, preset="affine", device="cpu")
    pred = predict(model, prepared.target, prepared.images, prepared.labels, PATCH, device="cpu")
    assert torch.equal(pred.segmentation_index, fuse("majority", None, None, prepared.labels,
                                                     phantom_set.label_values).segmentation)


def test_windows_run_only_where_the_atlas_union_or_the_target_has_content():
    shape, roi = (48, 40, 44), (16, 16, 16)
    labels = torch.zeros(3, *shape, dtype=torch.int64)
    labels[0, 20:26, 10:18, 15:20] = 1
    labels[1, 22:28, 12:19, 16:22] = 2
    target = torch.zeros(1, *shape)
    target[0, 5:9, 30:33, 3:6] = 1.0               # target content elsewhere: only the plain U-Net's box uses it
    region = prediction_region(target, labels, roi, margin=2)
    assert region == (slice(16, 32), slice(7, 23), slice(11, 27))   # union box + 2, grown to one 16^3 window
    assert prediction_region(target, None, roi, margin=1) == (slice(0, 16), slice(24, 40), slice(0, 16))
    assert prediction_region(torch.rand(1, *shape), None, roi) == (slice(0, 48), slice(0, 40), slice(0, 44))

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, *shape, generator=gen)
    target = torch.rand(1, *shape, generator=gen)
    untrained = DeepLabelFusion(DLFConfig(n_labels=3, **TINY)).eval()       # exactly majority voting
    whole = predict(untrained, target, images, labels, roi, crop=False, device="cpu")
    cropped = predict(untrained, target, images, labels, roi, device="cpu")
    assert torch.equal(cropped.segmentation_index, whole.segmentation_index)
    assert torch.allclose(cropped.initial, whole.initial, atol=1e-6)
    torch.manual_seed(2)
    model = DeepLabelFusion(DLFConfig(n_labels=3, **TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    whole = predict(model.eval(), target, images, labels, roi, crop=False, device="cpu").segmentation_index
    cropped = predict(model, target, images, labels, roi, device="cpu").segmentation_index
    outside = torch.ones(shape, dtype=torch.bool)
    outside[prediction_region(target, labels, roi)] = False
    assert int(outside.sum()) > 0.5 * outside.numel()
    assert int(whole[outside].count_nonzero()) == 0 and int(cropped[outside].count_nonzero()) == 0   # the mask
    assert float((cropped == whole).float().mean()) > 0.98


def test_atlas_draws_have_exactly_n_with_duplicates_only_when_needed():
    rng = np.random.default_rng(0)
    few = draw_atlases(["a", "b", "c"], 3, rng)
    assert sorted(few) == ["a", "b", "c"]
    many = draw_atlases(["a", "b"], 5, rng)
    assert len(many) == 5 and set(many) <= {"a", "b"}


# ---------------------------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_loss_and_raises_validation_dice(trained):
    history = trained["result"].history
    losses = [r["train_loss"] for r in history]
    dice = [r["val_dice"] for r in history]
    untrained = history[0]["val_dice_majority"]     # an untrained DLF is majority voting (zero-initialised heads)
    print(f"loss per epoch {np.round(losses, 3)}; val Dice {np.round(dice, 3)}; majority {untrained:.3f}")
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    assert max(dice) > untrained + 0.03
    config = json.loads((trained["folder"] / "config.json").read_text())
    assert config["validation"]["best_mean_dice"] == pytest.approx(max(dice))
    assert config["labels"]["4"] == "hippocampus" and config["modalities"] == {"0": "MRI"}
    png = sitk.ReadImage(str(trained["folder"] / "training_curves.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetWidth() > 300


def test_trained_dlf_beats_majority_voting_on_held_out_phantoms(trained, phantom_set):
    loaded = load_model(trained["folder"])
    dlf_scores, mv_scores = [], []
    for seed in (9001, 9002):
        image, label = make_phantom(seed=seed, **PHANTOM)
        result = segment_dlf([image], phantom_set, loaded, n_atlases=4, preset="affine", device="cpu",
                             show_progress=False)
        reference = torch.from_numpy(sitk.GetArrayFromImage(label).astype(np.int64))
        majority = fuse("majority", None, None, result.warped_labels, phantom_set.label_values).segmentation
        dlf_scores.append(np.mean(dice_per_label(result.fusion.segmentation, reference, 5)))
        mv_scores.append(np.mean(dice_per_label(majority, reference, 5)))
    print(f"held-out mean Dice: DLF {np.round(dlf_scores, 3)}, majority voting {np.round(mv_scores, 3)}")
    assert np.mean(dlf_scores) > np.mean(mv_scores) + 0.02


def test_resume_continues_from_the_saved_epoch(trained):
    rows = list(csv.DictReader(open(trained["folder"] / "training_log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    first_two = trained["interrupted"]["history"]
    assert [float(r["train_loss"]) for r in rows[:2]] == pytest.approx([r["train_loss"] for r in first_two])
    assert any("resuming" in m and "after epoch 2" in m for m in trained["messages"])
    checkpoint = torch.load(trained["folder"] / "checkpoint.pt", weights_only=True)
    interrupted = torch.load(trained["snapshot"] / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 8 and interrupted["epoch"] == 2
    # training went on from the interrupted weights: the last weights moved away from them
    assert any(not torch.equal(interrupted["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])
    assert checkpoint["best_epoch"] == int(np.argmax([r["val_dice"] for r in trained["result"].history])) + 1
    # a finished run resumed again does nothing; a new run into the same folder is refused
    again = train(_set_of(trained), trained["snapshot"], DLFConfig(n_labels=5, **TINY), tiny_training(2),
                  trained["cache"], "cpu", resume=True, log=lambda m: None, show_progress=False)
    assert len(again.history) == 2 and again.epochs_run == 0 and trained["result"].epochs_run == 6
    # a checkpoint written before a setting existed resumes with that setting at its default
    older = shutil.copytree(trained["snapshot"], trained["snapshot"].parent / "older_checkpoint")
    state = torch.load(older / "checkpoint.pt", weights_only=True)
    del state["identity"]["training"]["val_interval"]
    torch.save(state, older / "checkpoint.pt")
    assert len(train(_set_of(trained), older, DLFConfig(n_labels=5, **TINY), tiny_training(2), trained["cache"],
                     "cpu", resume=True, log=lambda m: None, show_progress=False).history) == 2
    with pytest.raises(TrainingError, match="pass --resume"):
        train(_set_of(trained), trained["folder"], DLFConfig(n_labels=5, **TINY), tiny_training(8), trained["cache"],
              "cpu", log=lambda m: None, show_progress=False)
    with pytest.raises(TrainingError, match="other settings"):
        train(_set_of(trained), trained["snapshot"], DLFConfig(n_labels=5, **TINY), tiny_training(4, seed=1),
              trained["cache"], "cpu", resume=True, log=lambda m: None, show_progress=False)


def test_validation_every_k_epochs_keeps_the_best_validated_weights(trained, tmp_path):
    result = train(_set_of(trained), tmp_path / "model", DLFConfig(n_labels=5, **TINY),
                   tiny_training(3, val_interval=2), trained["cache"], "cpu", log=lambda m: None, show_progress=False)
    val = [r["val_dice"] for r in result.history]
    assert np.isnan(val[0]) and not np.isnan(val[1]) and not np.isnan(val[2])   # epochs 2 and 3 (the last)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["validation"]["best_epoch"] == 2 + int(val[2] >= val[1])
    rows = list(csv.DictReader(open(tmp_path / "model" / "training_log.csv")))
    assert len(rows) == 3 and rows[0]["val_dice"] == "nan"


def test_a_plain_unet_resumes_across_atlas_sampling_settings_a_dlf_does_not(trained, tmp_path):
    """The U-Net baseline draws no atlases, so a finished one is reused when only the DLF's atlas sampling changed;
    a DLF checkpoint with other atlas sampling is refused."""
    unet = SegmenterConfig.plain_unet(TINY["finetune_channels"], n_labels=5)
    first = train_segmenter(_set_of(trained), tmp_path / "unet", unet, tiny_training(2), "cpu",
                            log=lambda m: None, show_progress=False)
    again = train_segmenter(_set_of(trained), tmp_path / "unet", unet,
                            tiny_training(2, n_atlases=6, candidates_per_target=3), "cpu", resume=True,
                            log=lambda m: None, show_progress=False)
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in first.history]
    with pytest.raises(TrainingError, match="other settings"):
        train_segmenter(_set_of(trained), tmp_path / "unet", unet, tiny_training(2, learning_rate=1e-3), "cpu",
                        resume=True, log=lambda m: None, show_progress=False)
    with pytest.raises(TrainingError, match="other settings"):
        train(_set_of(trained), trained["snapshot"], DLFConfig(n_labels=5, **TINY), tiny_training(2, n_atlases=3),
              trained["cache"], "cpu", resume=True, log=lambda m: None, show_progress=False)


def _set_of(trained):
    config = json.loads((trained["folder"] / "config.json").read_text())
    return load_atlas_set(config["training"]["atlas_root"])


# ---------------------------------------------------------------------------------------------------------------
# model folders


def test_corrupted_or_mismatched_model_folders_fail_clearly(trained, phantom_set, tmp_path):
    good = trained["folder"]

    def copy(name):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("model.safetensors", "config.json"):
            shutil.copy(good / f, folder / f)
        return folder

    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="truncated.*checksum"):
        load_model(truncated)
    config = json.loads((truncated / "config.json").read_text())
    del config["weights_sha256"]
    (truncated / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="truncated.*unreadable safetensors"):
        load_model(truncated)

    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text('{"format": "atlasseg-dlf-model", ')
    with pytest.raises(ModelFolderError, match="bad_json.*invalid JSON"):
        load_model(bad_json)
    with pytest.raises(ModelFolderError, match="not found"):
        load_model(tmp_path / "missing")

    wrong_arch = copy("wrong_arch")
    config = json.loads((wrong_arch / "config.json").read_text())
    config["architecture"]["finetune_channels"] = [8, 16, 32, 64]
    del config["weights_sha256"]
    (wrong_arch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="wrong_arch.*do not fit"):
        load_model(wrong_arch)

    loaded = load_model(good)
    other_labels = load_atlas_set(phantom_set.root, validate=False)
    other_labels.labels = {0: "background", 1: "tissue", 2: "ventricles"}
    with pytest.raises(ModelFolderError, match=r"labels \[0, 1, 2, 3, 4\].*\[0, 1, 2\]"):
        check_compatible(loaded, other_labels)
    two_modalities = load_atlas_set(phantom_set.root, validate=False)
    two_modalities.modalities = {0: "T1", 1: "T2"}
    with pytest.raises(ModelFolderError, match="1 modalities.*2"):
        check_compatible(loaded, two_modalities)
    with pytest.raises(ModelFolderError, match=r"1 modality image\(s\) per target, got 2"):
        check_compatible(loaded, phantom_set, n_target_modalities=2)


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_dlf_train_and_segment_end_to_end(phantom_set, tmp_path, capsys):
    model = tmp_path / "model"
    args = ["dlf-train", "--atlases", str(phantom_set.root), "--output", str(model), "--epochs", "1",
            "--n-atlases", "2", "--candidates", "2", "--device", "cpu", "--patch-size", "24", "24", "24",
            "--vote-channels", "4", "8", "16", "--finetune-channels", "4", "8", "16", "32", "--preset", "affine",
            "--val-fraction", "0.2", "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0

    image, label = make_phantom(seed=9003, **PHANTOM)
    target, reference = tmp_path / "target.nii.gz", tmp_path / "reference.nii.gz"
    sitk.WriteImage(image, str(target))
    sitk.WriteImage(label, str(reference))
    out = tmp_path / "seg"
    assert main(["segment", "--target", str(target), "--atlases", str(phantom_set.root), "--output", str(out),
                 "--method", "dlf", "--model", str(model), "--maps", "--reference", str(reference),
                 "--device", "cpu", "--quiet"]) == 0
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert seg.GetSize() == image.GetSize() and np.allclose(seg.GetOrigin(), image.GetOrigin())
    assert (out / "initial_segmentation.nii.gz").is_file()
    maps = {p.name for p in (out / "maps").iterdir()}
    assert "votes_4_hippocampus.nii.gz" in maps and "probability_4_hippocampus.nii.gz" in maps
    weights = sorted(m for m in maps if m.startswith("weights_"))
    assert len(weights) == 2 * 5 and weights[0].startswith("weights_phantom_") and "_0_background" in weights[0]
    assert json.loads((out / "metrics.json").read_text())["mean"]["dice"] > 0.3
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "dlf" and run["model"] == str(model)

    capsys.readouterr()
    assert main(["segment", "--target", str(target), "--atlases", str(phantom_set.root), "--output",
                 str(tmp_path / "x"), "--method", "dlf", "--device", "cpu", "--quiet"]) == 2
    assert "--model" in capsys.readouterr().err
    (model / "config.json").write_text("{not json")
    assert main(["segment", "--target", str(target), "--atlases", str(phantom_set.root), "--output",
                 str(tmp_path / "y"), "--method", "dlf", "--model", str(model), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "invalid JSON" in err
