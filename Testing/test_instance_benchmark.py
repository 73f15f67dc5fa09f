"""Tests of the instance-segmentation benchmark (atlasseg.benchmarks.instances): the phantom folder's layout and
geometry, the trainer's batches, and a tiny end-to-end run (train on the generic Trainer, resume, post-process,
AP-75, markdown). The AP-75 >= 0.9 target is the benchmark's job, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasseg.atlas import load_atlas_set
from atlasseg.benchmarks.instances import (
    InstanceTrainer,
    benchmark_training_config,
    load_instance_case,
    load_instance_model,
    run_instances_benchmark,
    write_instance_phantom_set,
)
from atlasseg.instances import instance_targets
from atlasseg.networks import BackboneSpec
from atlasseg.training import AugmentConfig, Augmenter, TrainConfig, TrainingError

TINY = BackboneSpec("resunet_h", kwargs={"channels": [4, 8, 16], "norm": "instance"})
SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return write_instance_phantom_set(tmp_path_factory.mktemp("blobs") / "train", 4, SHAPE, seed=3)


def test_phantom_folder_layout_and_geometry(tiny_set):
    meta = json.loads((tiny_set / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "object"} and len(meta["modality"]) == 1
    atlas_set = load_atlas_set(tiny_set)
    assert len(atlas_set) == 4 and atlas_set.label_values == [0, 1]
    seen = []
    for case in atlas_set.cases:
        image = sitk.ReadImage(str(case.images[0]))
        label = sitk.ReadImage(str(case.label))
        inst = sitk.ReadImage(str(tiny_set / "instancesTr" / case.label.name))
        for other in (label, inst):
            assert other.GetSize() == image.GetSize() == (32, 32, 8)
            assert other.GetSpacing() == image.GetSpacing() == (1.0, 1.0, 4.0)
            assert other.GetOrigin() == image.GetOrigin() and other.GetDirection() == image.GetDirection()
        lab, ids = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(inst)
        np.testing.assert_array_equal(lab, (ids > 0).astype(lab.dtype))
        assert ids.max() >= 1
        _, instances = load_instance_case(atlas_set, case.case_id)
        assert instances.dtype == torch.int64 and instances.shape == SHAPE
        seen.append(ids)
    assert not np.array_equal(seen[0], seen[1])              # a different seed per case
    # same arguments: the folder is kept as it is
    before = (tiny_set / "imagesTr" / "blobs_000.nii.gz").stat().st_mtime_ns
    write_instance_phantom_set(tiny_set, 4, SHAPE, seed=3)
    assert (tiny_set / "imagesTr" / "blobs_000.nii.gz").stat().st_mtime_ns == before


def test_trainer_batches_carry_exact_targets(tiny_set, tmp_path):
    atlas_set = load_atlas_set(tiny_set)
    config = benchmark_training_config(1, patch_size=(8, 16, 16), patches_per_target=1)
    trainer = InstanceTrainer(atlas_set, tmp_path / "m", config, TINY, device="cpu", show_progress=False)
    trainer.prepare_data()
    case = trainer.train_cases[0]
    _, instances = load_instance_case(atlas_set, case.target_id)
    mask, boundary = instance_targets(instances)
    assert torch.equal(case.atlas_labels[0].float(), mask) and torch.equal(case.atlas_labels[1].float(), boundary)
    augmenter = Augmenter(config.augment)
    batch = trainer.make_batch(case, np.random.default_rng(0), augmenter)
    assert batch["image"].shape == (1, 1, 8, 16, 16) and batch["targets"].shape == (1, 2, 8, 16, 16)
    targets = batch["targets"][0]
    assert set(torch.unique(targets).tolist()) <= {0.0, 1.0}
    assert bool((targets[1] <= targets[0]).all())            # contours lie inside the mask
    loss = trainer.compute_loss(trainer.build_model(), batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(TrainingError, match="spatial_prob"):
        InstanceTrainer(atlas_set, tmp_path / "x", TrainConfig(augment=AugmentConfig(spatial_prob=0.5)), TINY)


def test_tiny_benchmark_end_to_end_and_resume(tmp_path):
    torch.set_num_threads(1)
    work, md = tmp_path / "work", tmp_path / "bench.md"
    kwargs = {"shape": SHAPE, "patch_size": SHAPE, "patches_per_target": 3, "backbone": TINY, "device": "cpu"}
    out = run_instances_benchmark(work, md, epochs=3, n_train=4, n_test=2, seed=0, log=lambda m: None, **kwargs)
    losses = [h["train_loss"] for h in out["history"]]
    assert out["epochs_run"] == 3 and len(losses) == 3 and losses[-1] < losses[0]
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        assert 0.0 <= row["ap75_watershed"] <= 1.0 and 0.0 <= row["ap75_cc"] <= 1.0
        assert row["n_gt"] >= 1
    assert out["min_size"] >= 1
    model, config = load_instance_model(out["model_folder"])
    assert config["backbone"]["name"] == "resunet_h" and config["outputs"] == ["mask", "boundary"]
    assert (work / "model" / "model.safetensors").is_file() and (work / "model" / "checkpoint.pt").is_file()
    text = md.read_text()
    assert "<!-- instances:start -->" in text and "AP-75" in text and "blobs_001" in text
    assert "Target AP-75 >= 0.9" in text
    # a second call reuses the finished training and rewrites the section in place
    again = run_instances_benchmark(work, md, epochs=3, n_train=4, n_test=2, seed=0, log=lambda m: None, **kwargs)
    assert again["epochs_run"] == 0
    assert [r["ap75_watershed"] for r in again["rows"]] == [r["ap75_watershed"] for r in out["rows"]]
    assert md.read_text().count("<!-- instances:start -->") == 1
