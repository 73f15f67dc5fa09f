"""Tests for the Res-UNet-R/H backbones (atlasseg.networks.resunet_em) and the instance tools (atlasseg.instances):
shapes and layout of the networks, the weighted BCE against hand-computed values, boundary targets, the seeded
watershed against connected components, the AP-75 metric on hand-checked cases, the touching-blobs phantom."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlasseg.instances import (
    average_precision,
    connected_components_instances,
    instance_iou,
    instance_targets,
    match_instances,
    relabel_instances,
    seeded_watershed,
    touching_blobs_phantom,
    weighted_bce,
)
from atlasseg.networks import BACKBONES, BackboneSpec, backbone_names, build_backbone
from atlasseg.networks.resunet_em import AnisotropicResBlock, ResUNetH, ResUNetR

SMALL = {"channels": [4, 6, 8], "norm": "instance"}
LOG2 = math.log(2.0)


def _bce(logit: float, target: int) -> float:
    return math.log1p(math.exp(-logit)) if target else math.log1p(math.exp(logit))


# ------------------------------------------------------------------------------------------------- backbones

def test_registered_with_presets():
    assert {"resunet_r", "resunet_h"} <= set(backbone_names())
    for name in ("resunet_r", "resunet_h"):
        info = BACKBONES[name]
        assert set(info.presets) == {"cpu", "paper"}
        # the authors' widths: Res-UNet-R 28-80 with batch norm; Res-UNet-H (their rsunet) 16-80, no norm, pooling
        assert info.presets["paper"]["channels"] == ([28, 36, 48, 64, 80] if name == "resunet_r"
                                                     else [16, 32, 48, 64, 80])
        net = build_backbone(BackboneSpec(name, preset="cpu"), in_channels=1, out_channels=1)
        assert net.boundary_channels == 1
        assert net.size_divisor == (1, 8, 8)
    assert isinstance(build_backbone("resunet_r", 1, 1), ResUNetR)
    assert isinstance(build_backbone("resunet_h", 1, 1), ResUNetH)


@pytest.mark.parametrize("cls", [ResUNetR, ResUNetH])
@pytest.mark.parametrize("boundary", [1, 2])
def test_output_shape_odd_sizes(cls, boundary):
    torch.manual_seed(0)
    net = cls(2, 3, boundary_channels=boundary, **SMALL)
    out = net(torch.randn(2, 2, 5, 19, 13))
    assert out.shape == (2, 3 + boundary, 5, 19, 13)
    assert torch.isfinite(out).all()


def test_resunet_r_without_boundary_and_options():
    net = ResUNetR(1, 2, boundary_channels=0, channels=[4, 6], norm="none", down="pool", up="transpose")
    assert net(torch.randn(1, 1, 3, 7, 9)).shape == (1, 2, 3, 7, 9)
    net = ResUNetH(1, 1, channels=[4, 6], norm="batch", up="transpose")
    assert net(torch.randn(2, 1, 3, 7, 9)).shape == (2, 2, 3, 7, 9)


@pytest.mark.parametrize("kwargs", [{"deep_supervision": 1}, {"norm": "group"}, {"down": "avg"}, {"up": "nearest"},
                                    {"channels": [8]}, {"boundary_channels": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ResUNetR(1, 1, **{"channels": [4, 6], **kwargs})


def test_h_needs_a_boundary_channel():
    with pytest.raises(ValueError, match="boundary_channels"):
        ResUNetH(1, 1, channels=[4, 6], boundary_channels=0)
    with pytest.raises(ValueError, match="bad arguments"):
        build_backbone("resunet_h", 1, 1, bogus=3)


@pytest.mark.parametrize("cls", [ResUNetR, ResUNetH])
def test_gradients_reach_first_conv(cls):
    torch.manual_seed(0)
    net = cls(1, 1, **SMALL)
    net(torch.randn(1, 1, 3, 8, 8)).square().mean().backward()
    first = net.encoder.blocks[0].conv_in
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    for layer in net.output_layers():
        assert layer.weight.grad.abs().sum() > 0


def test_block_layout_and_residual():
    net = ResUNetR(1, 1, **SMALL)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [tuple(c.kernel_size) for c in convs[:3]] == [(1, 3, 3), (3, 3, 3), (3, 3, 3)]
    for block in (m for m in net.modules() if isinstance(m, AnisotropicResBlock)):
        assert block.conv_in.kernel_size == (1, 3, 3)
        assert block.conv1.kernel_size == (3, 3, 3) and block.conv2.kernel_size == (3, 3, 3)
    # the skip spans the two 3x3x3 convs: with conv2 zeroed the block is elu(elu(conv_in(x)))
    torch.manual_seed(1)
    block = AnisotropicResBlock(2, 3, norm="none")
    torch.nn.init.zeros_(block.conv2.weight)
    torch.nn.init.zeros_(block.conv2.bias)
    x = torch.randn(1, 2, 3, 5, 5)
    assert torch.allclose(block(x), F.elu(F.elu(block.conv_in(x))))


@pytest.mark.parametrize("cls", [ResUNetR, ResUNetH])
@pytest.mark.parametrize("down", ["conv", "pool"])
def test_in_plane_only_downsampling(cls, down):
    net = cls(1, 1, channels=[4, 6, 8, 10], down=down, norm="none")
    assert net.size_divisor == (1, 8, 8)
    feats = net.encoder(torch.randn(1, 1, 5, 16, 24))
    assert [tuple(f.shape[2:]) for f in feats] == [(5, 16, 24), (5, 8, 12), (5, 4, 6), (5, 2, 3)]
    assert [f.shape[1] for f in feats] == [4, 6, 8, 10]


def test_h_has_two_decoders():
    torch.manual_seed(0)
    net = ResUNetH(1, 2, boundary_channels=1, **SMALL).eval()
    assert len(net.output_layers()) == 2
    x = torch.randn(1, 1, 3, 11, 9)
    with torch.no_grad():
        before = net(x)
        for p in net.boundary_decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        after = net(x)
    assert torch.equal(before[:, :2], after[:, :2])           # mask channels untouched
    assert (before[:, 2:] - after[:, 2:]).abs().max() > 1e-3    # boundary channels moved
    with torch.no_grad():
        for p in net.mask_decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        again = net(x)
    assert torch.equal(after[:, 2:], again[:, 2:])
    assert not torch.equal(after[:, :2], again[:, :2])


def test_parameter_counts_of_presets():
    counts = {}
    for name in ("resunet_r", "resunet_h"):
        for preset in ("cpu", "paper"):
            net = build_backbone(BackboneSpec(name, preset=preset), 1, 1, boundary_channels=1)
            counts[name, preset] = sum(p.numel() for p in net.parameters())
    assert counts["resunet_r", "cpu"] < counts["resunet_h", "cpu"] < counts["resunet_r", "paper"]
    assert counts["resunet_r", "paper"] < counts["resunet_h", "paper"] < 5_000_000


# ------------------------------------------------------------------------------------------------- weighted BCE

def test_weighted_bce_hand_computed():
    logits = torch.tensor([0.0, 0.0, 1.0, -1.0]).view(1, 1, 4)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 4)
    terms = [_bce(0.0, 1), _bce(0.0, 0), _bce(1.0, 0), _bce(-1.0, 0)]
    # W_f = 0.25: foreground weight 0.75 and background 0.25, divided by 0.25 (the authors' scale)
    expected = (3 * terms[0] + sum(terms[1:])) / 4
    assert weighted_bce(logits, target).item() == pytest.approx(expected, rel=1e-6)
    raw = (0.75 * terms[0] + 0.25 * sum(terms[1:])) / 4
    assert weighted_bce(logits, target, normalize=False).item() == pytest.approx(raw, rel=1e-6)


def test_weighted_bce_clipped_cases():
    zeros = torch.zeros(1, 1, 2, 2, 2)
    ones = torch.ones(1, 1, 2, 2, 2)
    # all foreground: W_f = 1 clipped to 0.99, weight 0.01 (raw) or 0.01 / 0.01 = 1 (authors' unit weights)
    assert weighted_bce(zeros, ones, normalize=False).item() == pytest.approx(0.01 * LOG2, rel=1e-5)
    assert weighted_bce(zeros, ones).item() == pytest.approx(LOG2, rel=1e-6)
    # all background: W_f = 0 clipped to 0.05
    assert weighted_bce(zeros, zeros, normalize=False).item() == pytest.approx(0.05 * LOG2, rel=1e-5)
    # 1 foreground voxel of 40: W_f = 0.025 clipped to 0.05, foreground weight 0.95 / 0.05 = 19
    target = torch.zeros(1, 1, 40)
    target[0, 0, 7] = 1
    assert weighted_bce(torch.zeros(1, 1, 40), target).item() == pytest.approx((19 + 39) * LOG2 / 40, rel=1e-6)
    # custom clip
    assert weighted_bce(zeros, ones, clip=(0.1, 0.9), normalize=False).item() == pytest.approx(0.1 * LOG2)
    with pytest.raises(ValueError):
        weighted_bce(zeros, ones, clip=(0.0, 0.9))
    with pytest.raises(ValueError):
        weighted_bce(zeros, ones[..., :1])


def test_weighted_bce_per_sample_or_batch_and_gradient():
    target = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]]).view(2, 1, 4)
    logits = torch.zeros(2, 1, 4, requires_grad=True)
    # per sample: W_f = 0.25 (weights 3 / 1) and 0.75 (weights 1 / 3): (3 + 3 + 3 + 3) log2 / 8
    loss = weighted_bce(logits, target)
    assert loss.item() == pytest.approx(1.5 * LOG2, rel=1e-6)
    # per batch: W_f = 0.5, unit weights: plain BCE
    assert weighted_bce(logits, target, per_sample=False).item() == pytest.approx(LOG2, rel=1e-6)
    loss.backward()
    # d/dl of w * bce at l = 0 is w * (sigmoid(0) - t) / N
    assert logits.grad[0, 0, 0].item() == pytest.approx(3 * -0.5 / 8)
    assert logits.grad[1, 0, 3].item() == pytest.approx(3 * 0.5 / 8)


# ------------------------------------------------------------------------------------------------- targets

def _two_touching_cubes() -> np.ndarray:
    lab = np.zeros((6, 6, 10), np.int64)
    lab[1:5, 1:5, 1:5] = 1
    lab[1:5, 1:5, 5:9] = 2
    return lab


def test_instance_targets_two_touching_cubes():
    lab = _two_touching_cubes()
    mask, boundary = instance_targets(lab)
    assert isinstance(mask, np.ndarray) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, (lab > 0).astype(np.float32))
    expected = (lab > 0).astype(np.float32)
    expected[2:4, 2:4, 2:4] = 0          # 2x2x2 interior of cube 1
    expected[2:4, 2:4, 6:8] = 0          # and of cube 2; everything else of a 4^3 cube is on its surface
    np.testing.assert_array_equal(boundary, expected)
    assert boundary.sum() == 2 * (64 - 8)
    # both faces of the contact are boundary, so the interiors are apart
    assert boundary[1:5, 1:5, 4].all() and boundary[1:5, 1:5, 5].all()


def test_instance_targets_edges_and_connectivity():
    # instances filling the volume: only the contact is boundary (outside the volume does not count)
    lab = torch.zeros(2, 2, 4, dtype=torch.int64)
    lab[..., :2] = 1
    lab[..., 2:] = 2
    mask, boundary = instance_targets(lab)
    assert isinstance(boundary, torch.Tensor)
    assert mask.sum() == 16
    assert torch.equal(boundary[..., 1] + boundary[..., 2], torch.full((2, 2), 2.0))
    assert boundary[..., 0].sum() == 0 and boundary[..., 3].sum() == 0
    # a voxel whose only differing neighbour is a corner (26) or an edge (18) away
    lab = np.ones((3, 3, 3), np.int64)
    lab[0, 0, 0] = 2
    b = {c: instance_targets(lab, connectivity=c)[1] for c in (6, 18, 26)}
    assert b[6][0, 0, 0] == b[18][0, 0, 0] == b[26][0, 0, 0] == 1
    assert (b[6][1, 1, 1], b[18][1, 1, 1], b[26][1, 1, 1]) == (0, 0, 1)
    assert (b[6][0, 1, 1], b[18][0, 1, 1], b[26][0, 1, 1]) == (0, 1, 1)
    assert b[6].sum() == 4 and b[18].sum() == 7 and b[26].sum() == 8
    with pytest.raises(ValueError):
        instance_targets(lab, connectivity=8)
    with pytest.raises(ValueError):
        instance_targets(lab[0])


def test_instance_targets_match_scipy_on_phantom():
    ndimage = pytest.importorskip("scipy.ndimage")
    _, lab = touching_blobs_phantom(shape=(8, 32, 32), n_blobs=5, seed=3)
    for connectivity, rank in ((6, 1), (26, 3)):
        _, boundary = instance_targets(lab, connectivity=connectivity)
        footprint = ndimage.generate_binary_structure(3, rank)
        hi = ndimage.grey_dilation(lab, footprint=footprint, mode="nearest")
        lo = ndimage.grey_erosion(lab, footprint=footprint, mode="nearest")
        reference = (lab > 0) & ((hi != lab) | (lo != lab))
        np.testing.assert_array_equal(boundary.astype(bool), reference)


# ------------------------------------------------------------------------------------------------- post-processing

def _two_touching_boxes() -> np.ndarray:
    gt = np.zeros((6, 16, 24), np.int64)
    gt[1:5, 2:14, 2:12] = 1
    gt[1:5, 2:14, 12:22] = 2
    return gt


def test_seeded_watershed_splits_touching_blobs():
    gt = _two_touching_boxes()
    mask, boundary = instance_targets(gt)
    ws = seeded_watershed(mask, boundary, min_size=10)
    assert isinstance(ws, np.ndarray) and ws.dtype == np.int64
    assert ws.max() == 2
    _, _, _, _, iou = instance_iou(ws, gt)
    assert (iou.max(dim=0).values >= 0.9).all()
    cc = connected_components_instances(mask, min_size=10)
    assert cc.max() == 1
    # without the boundary the seeds touch and the watershed merges them too
    assert seeded_watershed(mask, boundary, seed_boundary=1.5, min_size=10).max() == 1
    # torch in, torch out
    wst = seeded_watershed(torch.from_numpy(mask), torch.from_numpy(boundary), min_size=10)
    assert isinstance(wst, torch.Tensor) and wst.dtype == torch.int64
    np.testing.assert_array_equal(wst.numpy(), ws)


def test_seeded_watershed_thresholds_and_min_size():
    gt = _two_touching_boxes()
    mask, boundary = instance_targets(gt)
    mask = mask.copy()
    mask[0, 0, 0:2] = 0.95               # an isolated foreground crumb of 2 voxels with a seed
    mask[5, 14:16, 20:24] = 0.87         # a foreground component (> 0.85) without any seed (< 0.9)
    ws = seeded_watershed(mask, boundary, min_size=1)
    assert ws.max() == 3                 # the two boxes and the crumb
    assert (ws[5, 14:16, 20:24] == 0).all()
    assert seeded_watershed(mask, boundary, min_size=3).max() == 2
    assert (seeded_watershed(mask, boundary, min_size=10_000) == 0).all()
    assert (seeded_watershed(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))) == 0).all()
    lowered = seeded_watershed(mask, boundary, seed_mask=0.86, min_size=1)
    assert lowered.max() == 4            # the seedless component becomes an instance once seeded


def test_relabel_and_connected_components():
    lab = np.array([[[0, 5, 5, 0, 9, 0, 2, 2, 2]]])
    np.testing.assert_array_equal(relabel_instances(lab), [[[0, 2, 2, 0, 3, 0, 1, 1, 1]]])
    np.testing.assert_array_equal(relabel_instances(lab, min_size=2), [[[0, 2, 2, 0, 0, 0, 1, 1, 1]]])
    prob = np.array([[[0.2, 0.7, 0.6, 0.1, 0.9, 0.8, 0.81, 0.4, 0.55]]])
    np.testing.assert_array_equal(connected_components_instances(prob, min_size=1), [[[0, 1, 1, 0, 2, 2, 2, 0, 3]]])
    np.testing.assert_array_equal(connected_components_instances(prob, threshold=0.75, min_size=2),
                                  [[[0, 0, 0, 0, 1, 1, 1, 0, 0]]])


# ------------------------------------------------------------------------------------------------- AP-75

def test_instance_iou_against_brute_force():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, (4, 6, 7)) * 3        # labels 0, 3, 6, 9, 12 (not consecutive)
    gt = rng.integers(1, 4, (4, 6, 7))               # no background at all
    pred_ids, gt_ids, pred_sizes, gt_sizes, iou = instance_iou(pred, gt)
    assert pred_ids.tolist() == [3, 6, 9, 12] and gt_ids.tolist() == [1, 2, 3]
    for i, p in enumerate(pred_ids.tolist()):
        assert pred_sizes[i] == (pred == p).sum()
        for j, g in enumerate(gt_ids.tolist()):
            inter = ((pred == p) & (gt == g)).sum()
            union = ((pred == p) | (gt == g)).sum()
            assert iou[i, j].item() == pytest.approx(inter / union)


def test_average_precision_hand_checked():
    gt = np.zeros((1, 1, 30), np.int64)
    gt[..., 0:8], gt[..., 8:16], gt[..., 20:24] = 1, 2, 3
    # perfect, with other label values
    perfect = np.where(gt > 0, gt * 10 + 1, 0)
    assert average_precision(perfect, gt) == 1.0
    assert match_instances(perfect, gt)["matching_score"] == 1.0
    # the pair 1-2 merged (IoU 0.5 with each), 3 right; the larger (merged) prediction ranks first:
    # precision (0, 1/2), recall (0, 1/3) -> interpolated 1/2 at the 34 recall levels 0 .. 0.33 of 101
    merged = np.zeros_like(gt)
    merged[..., 0:16], merged[..., 20:24] = 5, 7
    assert average_precision(merged, gt) == pytest.approx(0.5 * 34 / 101)
    m = match_instances(merged, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 2)
    assert m["matching_score"] == pytest.approx(0.25)
    # with scores ranking the right one first: precision (1, 1/2), recall (1/3, 1/3)
    assert average_precision(merged, gt, scores={5: 0.1, 7: 0.9}) == pytest.approx(34 / 101)
    # at IoU 0.5 the merged one matches one of the pair: precision (1, 1), recall (1/3, 2/3)
    assert average_precision(merged, gt, iou_threshold=0.5) == pytest.approx(67 / 101)
    with pytest.raises(ValueError, match="no score"):
        average_precision(merged, gt, scores={5: 0.1})
    # nothing predicted, nothing to find
    assert average_precision(np.zeros_like(gt), gt) == 0.0
    assert math.isnan(average_precision(gt, np.zeros_like(gt)))


def test_average_precision_at_the_threshold():
    gt = np.zeros((1, 1, 140), np.int64)
    gt[..., :100] = 1
    pred = np.zeros_like(gt)
    pred[..., :75] = 4                      # IoU 75 / 100 = 0.75: a true positive at 0.75
    assert average_precision(pred, gt) == 1.0
    pred[..., 74] = 0                       # IoU 0.74
    assert average_precision(pred, gt) == 0.0
    pred[..., :133] = 4                     # IoU 100 / 133 = 0.752
    assert average_precision(pred, gt) == 1.0
    pred[..., :134] = 4                     # IoU 100 / 134 = 0.746
    assert average_precision(pred, gt) == 0.0
    assert average_precision(pred, gt, iou_threshold=0.7) == 1.0


# ------------------------------------------------------------------------------------------------- phantom

def test_phantom_properties():
    image, inst = touching_blobs_phantom(seed=0)
    assert image.shape == inst.shape == (16, 64, 64)
    assert image.dtype == np.float32 and inst.dtype == np.int64
    again_image, again = touching_blobs_phantom(seed=0)
    np.testing.assert_array_equal(again, inst)
    np.testing.assert_array_equal(again_image, image)
    assert not np.array_equal(touching_blobs_phantom(seed=1)[1], inst)
    n = int(inst.max())
    assert n >= 5 and set(np.unique(inst)) == set(range(n + 1))
    _, boundary = instance_targets(inst)
    interior = (inst > 0) & (boundary == 0)
    assert image[interior].mean() > 0.85
    assert 0.45 < image[boundary > 0].mean() < 0.65
    assert image[inst == 0].mean() < 0.35
    # touching: some instances are face neighbours of other instances
    contact = (inst[:, :, 1:] != inst[:, :, :-1]) & (inst[:, :, 1:] > 0) & (inst[:, :, :-1] > 0)
    assert contact.sum() > 50


def test_phantom_watershed_beats_connected_components():
    aps, cc_aps = [], []
    for seed in (0, 1, 2):
        _, inst = touching_blobs_phantom(seed=seed)
        mask, boundary = instance_targets(inst)
        ws = seeded_watershed(mask, boundary)
        cc = connected_components_instances(mask)
        aps.append(average_precision(ws, inst))
        cc_aps.append(average_precision(cc, inst))
        assert cc.max() < inst.max()
    assert min(aps) >= 0.95
    assert max(cc_aps) <= 0.5
    assert np.mean(aps) - np.mean(cc_aps) > 0.6


def test_network_to_instances_smoke():
    image, _ = touching_blobs_phantom(shape=(4, 16, 16), n_blobs=2, seed=0)
    net = build_backbone(BackboneSpec("resunet_h", kwargs=SMALL), 1, 1).eval()
    with torch.no_grad():
        probs = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0]
    labels = seeded_watershed(probs[0], probs[1], min_size=1)
    assert isinstance(labels, torch.Tensor) and labels.shape == (4, 16, 16) and labels.dtype == torch.int64
