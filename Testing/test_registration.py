"""Registration recovers known deformations and affines; warping keeps geometry and labels exact."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasseg.io import Geometry, image_to_tensor, labels_to_tensor
from atlasseg.phantom import apply_deformation, make_known_deformation, make_phantom
from atlasseg.registration import Registration, register, warp_atlases
from atlasseg.registration.filters import VelocityExponential, box_sum, gaussian_blur, lncc, lncc_with_gradient
from atlasseg.registration.torch_backend import _Metric
from atlasseg.registration.transforms import DisplacementField, compose, grid_points, warp_image, warp_labels

OBLIQUE = tuple(sitk.VersorTransform((0.2, 0.9, -0.3), 0.35).GetMatrix())


def dice(a: torch.Tensor, b: torch.Tensor, value: int) -> float:
    a, b = a == value, b == value
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def overall_label_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Multi-label Dice: voxels carrying the same non-zero label, over all labelled voxels of both maps."""
    agree = ((a == b) & (b > 0)).sum()
    return float(2 * agree / ((a > 0).sum() + (b > 0).sum()))


def mean_foreground_dice(a, b) -> float:
    values = [v for v in torch.unique(b).tolist() if v != 0]
    return float(np.mean([dice(a, b, v) for v in values]))


@pytest.fixture(scope="module")
def oblique_pair():
    """A phantom on an oblique, anisotropic grid, and a copy deformed by a known smooth field."""
    image, label = make_phantom(3, shape=(40, 48, 44), spacing=(1.1, 0.9, 1.3), direction=OBLIQUE,
                                origin=(5.0, -20.0, 12.0))
    field = make_known_deformation(image, magnitude_mm=4.0, seed=5, smoothness_mm=16.0)
    moved = apply_deformation(image, field, is_label=False)
    moved_label = apply_deformation(label, field, is_label=True)
    return image, label, moved, moved_label, field


@pytest.mark.parametrize("backend, per_label_min", [("torch", 0.9), ("greedy", 0.84)])
def test_recovers_known_smooth_deformation(oblique_pair, backend, per_label_min):
    target, target_label, atlas, atlas_label, _ = oblique_pair
    ref = labels_to_tensor(target_label)
    before = [dice(labels_to_tensor(atlas_label), ref, v) for v in (1, 2, 3, 4)]
    extra = {"threads": 1} if backend == "greedy" else {}  # greedy is deterministic on one thread
    (reg,) = register([target], [[atlas]], backend=backend, device="cpu", **extra)
    _, warped = warp_atlases([reg], [[atlas]], [atlas_label], [0, 1, 2, 3, 4], device="cpu")
    after = [dice(warped[0], ref, v) for v in (1, 2, 3, 4)]
    assert overall_label_dice(labels_to_tensor(atlas_label), ref) < 0.8 and min(before) < 0.5
    # the labels of the small structures went through nearest-neighbour resampling twice: ~0.95 is their cap
    assert overall_label_dice(warped[0], ref) >= 0.95, (before, after)
    assert min(after) >= per_label_min, (before, after)
    assert reg.forward.geometry.same_as(Geometry.of(target))
    assert reg.inverse.geometry.same_as(Geometry.of(atlas))


def test_inverse_composed_with_forward_is_identity(oblique_pair):
    target, target_label, atlas, _, _ = oblique_pair
    (reg,) = register([target], [[atlas]], backend="torch", device="cpu")
    roundtrip = compose(reg.inverse, reg.forward)  # target -> atlas -> target
    error = roundtrip.field.norm(dim=0)
    inside = labels_to_tensor(target_label) > 0
    assert float(error[inside].mean()) < 0.1 and float(error[inside].max()) < 0.6  # mm, voxels ~1 mm
    assert reg.forward.field.norm(dim=0)[inside].mean() > 1.0  # and the transform is not trivial


def test_large_volumes_register_on_a_coarser_working_grid(oblique_pair):
    """Above ``max_voxels`` the finest level is coarsened and fields are resampled onto the full grid."""
    target, target_label, atlas, atlas_label, _ = oblique_pair
    (reg,) = register([target], [[atlas]], backend="torch", device="cpu", max_voxels=20_000)
    assert reg.forward.geometry.same_as(Geometry.of(target))
    _, warped = warp_atlases([reg], [[atlas]], [atlas_label], [0, 1, 2, 3, 4], device="cpu")
    ref = labels_to_tensor(target_label)
    assert overall_label_dice(warped[0], ref) >= 0.93
    inside = ref > 0
    assert float(compose(reg.inverse, reg.forward).field.norm(dim=0)[inside].mean()) < 0.2


def test_affine_recovers_known_transform():
    image, label = make_phantom(4, shape=(44, 52, 44), deformation_mm=0.0)
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    truth = sitk.AffineTransform(3)
    truth.SetCenter(center.tolist())
    rot = sitk.VersorTransform((0.3, 0.2, 1.0), np.deg2rad(7)).GetMatrix()
    truth.SetMatrix((np.asarray(rot).reshape(3, 3) @ np.diag([1.06, 0.95, 1.02])).ravel().tolist())
    truth.SetTranslation((2.5, -3.0, 1.5))
    # atlas(y) = image(T^-1 y): registering the atlas to the image must find T (image point -> atlas point)
    atlas = sitk.Resample(image, image, truth.GetInverse(), sitk.sitkLinear, 0.0)
    (reg,) = register([image], [[atlas]], backend="torch", device="cpu", preset="affine")
    pts = grid_points(Geometry.of(image)).reshape(-1, 3).double()
    inside = (labels_to_tensor(label) > 0).reshape(-1)
    found = (pts + reg.forward.field.permute(1, 2, 3, 0).reshape(-1, 3).double())[inside]
    m = np.asarray(truth.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(truth.GetCenter()), np.asarray(truth.GetTranslation())
    expected = (pts[inside].numpy() - c) @ m.T + c + t
    error = np.linalg.norm(found.numpy() - expected, axis=1)
    assert error.mean() < 0.5 and np.percentile(error, 95) < 1.0, (error.mean(), error.max())


def _stretched_pair(factor: float):
    """A phantom and a copy stretched by ``factor`` along x about its centre (image point -> atlas point: x
    scaled by ``factor``)."""
    image, _ = make_phantom(4, shape=(44, 52, 44), deformation_mm=0.0)
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    truth = sitk.AffineTransform(3)
    truth.SetCenter(center.tolist())
    truth.SetMatrix(np.diag([factor, 1.0, 1.0]).ravel().tolist())
    return image, sitk.Resample(image, image, truth.GetInverse(), sitk.sitkLinear, 0.0)


@pytest.mark.parametrize("backend", ["torch", "greedy"])
def test_affine_scales_stay_within_max_scale(backend):
    """An atlas stretched 1.8x along x: unbounded, the affine finds a stretch (greedy's varies from run to run,
    1.55-1.75 here); with max_scale=1.25 the torch backend keeps its scales on [1/1.25, 1.25] (projected) and
    greedy falls back to a rigid registration. Within the bound nothing changes (bit for bit with torch)."""
    from atlasseg.deepatlas.grid import affine_from_field
    from atlasseg.registration.transforms import affine_scales

    bound = 1.25
    extra = {"threads": 1} if backend == "greedy" else {}
    image, stretched = _stretched_pair(1.8)
    free, bounded = (affine_from_field(register([image], [[stretched]], backend=backend, device="cpu",
                                                 preset="affine", max_scale=limit, **extra)[0].forward)
                     for limit in (None, bound))
    assert affine_scales(free[:3, :3]).max() > 1.4, affine_scales(free[:3, :3])
    scales = affine_scales(bounded[:3, :3])
    assert scales.max() <= bound + 1e-3 and scales.min() >= 1 / bound - 1e-3, scales
    if backend == "greedy":
        assert np.allclose(scales, 1.0, atol=1e-3), scales                   # the rigid fallback
    else:
        assert scales.max() > bound - 0.02, scales                           # the constrained optimum: the bound

    image, mild = _stretched_pair(1.1)
    free, bounded = (register([image], [[mild]], backend=backend, device="cpu", preset="affine", max_scale=limit,
                              **extra)[0].forward for limit in (None, bound))
    if backend == "torch":
        assert torch.equal(free.field, bounded.field)
    else:                                   # greedy's affine differs from run to run in the third digit
        assert affine_scales(affine_from_field(bounded)[:3, :3]).max() > 1.08      # kept, not made rigid
    with pytest.raises(ValueError, match="max_scale must be a number >= 1"):
        register([image], [[mild]], backend=backend, device="cpu", preset="affine", max_scale=0.5)


def test_batched_registration_of_several_atlases(phantom_atlas_dir):
    from atlasseg.atlas import load_atlas_set

    s = load_atlas_set(phantom_atlas_dir)
    target = s.load(0)
    atlases = [s.load(i) for i in range(1, 5)]
    regs = register(target.images, [a.images for a in atlases], backend="torch", device="cpu")
    assert len(regs) == 4
    _, warped = warp_atlases(regs, [a.images for a in atlases], [a.label for a in atlases], s.label_values, "cpu")
    ref = labels_to_tensor(target.label)
    for k, a in enumerate(atlases):
        before = mean_foreground_dice(labels_to_tensor(a.label), ref)
        after = mean_foreground_dice(warped[k], ref)
        assert after > before + 0.05 and after > 0.8, (k, before, after)


def test_label_warping_is_label_aware_never_rounds_values():
    labels = torch.zeros(8, 8, 8, dtype=torch.int64)
    labels[:, :, :4] = 5
    labels[:, :, 4:] = 9
    geom = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    shift = torch.zeros(3, 8, 8, 8)
    shift[0] = 0.5  # half a voxel along x: linear interpolation of values would give 7 at the boundary
    out = warp_labels(labels, geom, DisplacementField(shift, geom), [0, 5, 9])
    assert set(torch.unique(out).tolist()) <= {0, 5, 9}
    identity = warp_labels(labels, geom, DisplacementField(torch.zeros(3, 8, 8, 8), geom), [0, 5, 9])
    assert torch.equal(identity, labels)
    # outside the moving grid is background
    far = torch.zeros(3, 8, 8, 8)
    far[0] = 100.0
    assert int(warp_labels(labels, geom, DisplacementField(far, geom), [0, 5, 9]).max()) == 0


def test_saved_fields_are_itk_transforms_that_simpleitk_applies_identically(oblique_pair, tmp_path):
    target, _, atlas, _, field = oblique_pair
    forward = DisplacementField.from_sitk(field)  # a known field on the target grid
    reg = Registration(forward, forward, "file", 0.0)
    fwd_path, _ = reg.save(tmp_path, "a")
    loaded = DisplacementField.load(fwd_path)
    assert loaded.geometry.same_as(forward.geometry) and torch.allclose(loaded.field, forward.field, atol=1e-5)
    ours = warp_image(image_to_tensor(atlas), Geometry.of(atlas), loaded)[0].numpy()
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(fwd_path)), sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(atlas, target, transform, sitk.sitkLinear, 0.0))
    interior = (slice(3, -3),) * 3
    assert np.abs(ours[interior] - theirs[interior]).max() < 1e-3 * np.abs(theirs).max()


def test_fast_filters_match_monai():
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    from monai.networks.blocks import DVF2DDF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 10, 12, 14, generator=g)
    y = x + 0.3 * torch.rand(2, 1, 10, 12, 14, generator=g)
    monai_map = LocalNormalizedCrossCorrelationLoss(3, 5, reduction="none")(y, x)
    assert torch.allclose(-lncc(y, x, 2), monai_map, atol=1e-4)
    v = torch.randn(2, 3, 10, 12, 14, generator=g)
    assert torch.allclose(VelocityExponential(7)(v), DVF2DDF(7, padding_mode="border")(v), atol=1e-4)
    # box-cascade Gaussian: variance of a smoothed impulse close to sigma^2
    impulse = torch.zeros(1, 1, 31, 31, 31)
    impulse[0, 0, 15, 15, 15] = 1.0
    out = gaussian_blur(impulse, 2.0)[0, 0]
    r = torch.arange(31.0) - 15
    var = float((out.sum(dim=(0, 1)) * r * r).sum())
    assert abs(float(out.sum()) - 1.0) < 1e-4 and abs(var - 4.0) < 0.7


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_box_sums_and_closed_form_lncc_gradient_match_references(radius):
    """Small windows use shifted adds, large ones cumulative sums: both equal a direct window sum; the LNCC
    gradient in closed form equals autograd's, with and without a mask and where a window's variance is clamped."""
    g = torch.Generator().manual_seed(radius)
    x = torch.rand(2, 3, 7, 9, 6, generator=g, dtype=torch.float64)
    for mode in ("constant", "replicate"):
        padded = torch.nn.functional.pad(x, [radius] * 6, mode=mode)
        direct = padded.unfold(2, 2 * radius + 1, 1).unfold(3, 2 * radius + 1, 1).unfold(4, 2 * radius + 1, 1)
        assert torch.allclose(box_sum(x, radius, mode), direct.sum(dim=(-3, -2, -1)), atol=1e-12)

    warped = torch.rand(3, 2, 8, 9, 7, generator=g, dtype=torch.float64)
    warped[1, :, :3] = 0.5                                        # flat: variance clamped to eps
    target = torch.rand(1, 2, 8, 9, 7, generator=g, dtype=torch.float64)
    for mask in (None, torch.rand(8, 9, 7, generator=g) > 0.4):
        metric = _Metric("lncc", radius, mask)
        leaf = warped.clone().requires_grad_(True)
        losses = metric(leaf, target.expand_as(warped))
        (reference,) = torch.autograd.grad(losses.sum(), leaf)
        values, gradient = metric.value_and_gradient(warped, target.expand_as(warped))
        assert torch.allclose(values, losses.detach(), atol=1e-12)
        assert float(reference.abs().max()) > 1e-5
        assert torch.allclose(gradient, reference, atol=1e-12 * float(reference.abs().max()) + 1e-15)
    cc, _ = lncc_with_gradient(warped, target, radius)
    assert torch.allclose(cc, lncc(warped, target, radius))
