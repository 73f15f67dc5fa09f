"""Batched multi-resolution registration in torch (CUDA when available, else CPU).

All N atlases are registered to one target in a single batched optimisation:
1. centre-of-mass ("moments") initialisation;
2. affine (12 dof per atlas), Adam on a scale-free parameterisation, multi-resolution;
3. deformable, greedy-style: the metric gradient w.r.t. the displacement is Gaussian smoothed (``sigma_pre``)
   and normalised to a maximal step of ``step`` voxels, then
   - ``model="compositive"`` (default): ``phi <- phi o (Id + delta)``, then smoothed (``sigma_post``); a
     composition of small smooth steps stays diffeomorphic; the inverse is found by fixed-point iteration;
   - ``model="svf"``: a stationary velocity field ``v <- G * (v + delta)``, ``phi = exp(v)`` by scaling and
     squaring (as MONAI's ``DVF2DDF``, with a cached grid), inverse ``exp(-v)``; exactly invertible but about
     twice as slow on CPU (seven field warps per iteration instead of one).

The forward map of atlas k is ``F_k(x) = A_k(x + u_k(x))`` (target physical point -> atlas physical point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from ..io import Geometry
from .filters import VelocityExponential, gaussian_blur, lncc, lncc_with_gradient
from .transforms import (
    DisplacementField,
    fields_from_affine_and_displacement,
    grid_points,
    sample,
)

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class TorchRegistrationSettings:
    """Settings of the torch backend. Iterations are per level, coarsest first; ``levels`` are shrink factors."""

    levels: tuple[int, ...] = (4, 2, 1)
    affine_iterations: tuple[int, ...] = (100, 50, 0)  # full-resolution affine steps changed Dice < 0.002
    deformable_iterations: tuple[int, ...] = (100, 50, 30)  # 30 at full size: +0.005/+0.01 MV Dice on
                                                            # hippocampus pool cases over 10 (not test targets)
    metric: str = "lncc"            # "lncc" or "mi"
    lncc_radius: int = 2            # window (2r+1)^3 voxels, like greedy's NCC 2x2x2
    affine_lr: float = 0.02         # Adam step on scale-free affine parameters at the coarsest level
    step: float = 1.0               # maximal deformable update per iteration (voxels of the level)
    sigma_pre: float = 1.5          # smoothing of the update (voxels); tuned on hippocampus pool cases
    sigma_post: float = 0.75        # smoothing of the displacement / velocity field (voxels)
    model: str = "compositive"      # "compositive" or "svf"
    svf_steps: int = 7              # scaling-and-squaring steps (svf model)
    inverse_iterations: int = 20    # fixed-point iterations of the inverse (compositive model)
    init: str = "moments"           # "moments" (centres of mass), "center" (grid centres) or "identity"
    max_scale: float | None = None  # affine scales (singular values) kept in [1/max_scale, max_scale] by projection
                                    # after every step (None: unconstrained)
    max_voxels: int = 1_500_000     # the finest level is coarsened (x2 per step) until it has at most this many
                                    # voxels; fields are then upsampled to the full grid (large volumes only)
    affine: bool = True
    deformable: bool = True


PRESETS = {
    "fast": TorchRegistrationSettings(levels=(4, 2, 1), affine_iterations=(60, 30, 0),
                                      deformable_iterations=(60, 30, 5)),
    "default": TorchRegistrationSettings(),
    "accurate": TorchRegistrationSettings(affine_iterations=(200, 100, 20), deformable_iterations=(200, 100, 50)),
    "affine": TorchRegistrationSettings(deformable=False),
}


@dataclass
class AffineDeformable:
    """Result of the torch optimisation for N atlases (all on the target grid)."""

    affine: torch.Tensor          # (N, 4, 4) physical, target -> atlas
    velocity: torch.Tensor        # (N, 3, z, y, x) voxel units of the finest level's grid, channels (z, y, x):
    model: str                    # the velocity for "svf", the displacement itself for "compositive"
    working_geometry: Geometry    # the grid of ``velocity`` (the finest level)
    final_loss: list[float]


def _pad_to(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Replicate-pad (C, Z, Y, X) at the high end to ``shape`` (index -> voxel mapping unchanged)."""
    pads = []
    for have, want in zip(reversed(volume.shape[1:]), reversed(shape)):
        pads += [0, want - have]
    if not any(pads):
        return volume
    return F.pad(volume[None], pads, mode="replicate")[0]


def _smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (B, C, Z, Y, X) with ``sigma`` voxels."""
    return gaussian_blur(volume, sigma)


def _center_of_mass(image: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """Intensity-weighted physical centre of (C, Z, Y, X) (first channel, negative values ignored)."""
    w = image[0].clamp(min=0).double()
    pts = grid_points(geometry, image.device, torch.float64)
    total = w.sum()
    if total <= 0:
        return geometry.center()
    return (pts * w[..., None]).sum(dim=(0, 1, 2)).div(total).cpu().numpy()


class _Metric:
    """Similarity loss per atlas: (N, C, ...) vs (N, C, ...) -> (N,) losses (lower is better)."""

    def __init__(self, name: str, radius: int, mask: torch.Tensor | None):
        if name == "lncc":
            # box-sum LNCC (same quantity as MONAI's LocalNormalizedCrossCorrelationLoss, ~10x faster on CPU)
            self.loss = lambda warped, target: -lncc(warped, target, radius)
        elif name == "mi":
            if mask is not None:
                raise ValueError("a registration mask is supported with the 'lncc' metric only")
            self.loss = GlobalMutualInformationLoss(reduction="none")
        else:
            raise ValueError(f"unknown registration metric '{name}': use 'lncc' or 'mi'")
        self.name, self.mask, self.radius = name, mask, radius

    def __call__(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.loss(warped, target)
        if self.name == "mi":
            return value.reshape(value.shape[0], -1).mean(dim=1)
        return self._masked_mean(value.mean(dim=1))  # over channels, then voxels

    def _weight_and_count(self, like: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """Per-voxel weight (the mask, or None) and the number of voxels it averages over."""
        if self.mask is None:
            return None, float(like[0, 0].numel())
        weight = self.mask.to(like)
        return weight, float(weight.sum().clamp(min=1))

    def _masked_mean(self, value: torch.Tensor) -> torch.Tensor:
        """(N, Z, Y, X) -> (N,) mean inside the mask (everywhere without one)."""
        weight, count = self._weight_and_count(value[:, None])
        weighted = value if weight is None else value * weight
        return weighted.reshape(value.shape[0], -1).sum(dim=1) / count

    def value_and_gradient(self, warped: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) losses and their gradient w.r.t. ``warped`` (N, C, ...); closed form for LNCC, else autograd."""
        if self.name != "lncc":
            warped = warped.detach().requires_grad_(True)
            with torch.enable_grad():
                losses = self(warped, target)
                (grad,) = torch.autograd.grad(losses.sum(), warped)
            return losses.detach(), grad
        weight, count = self._weight_and_count(warped)
        cc, grad = lncc_with_gradient(warped, target, self.radius, weight=weight)
        return -self._masked_mean(cc.mean(dim=1)), grad * (-1.0 / (warped.shape[1] * count))


class _Level:
    """Target and atlases prepared for one resolution level."""

    def __init__(self, factor: int, target: torch.Tensor, target_geometry: Geometry, atlases: torch.Tensor,
                 atlas_w2i: torch.Tensor, mask: torch.Tensor | None):
        self.factor = factor
        self.geometry = target_geometry.downsampled(factor)
        device = target.device
        full_w2i = torch.as_tensor(target_geometry.physical_to_index(), dtype=torch.float32, device=device)
        self.points = grid_points(self.geometry, device)  # (Z, Y, X, 3)
        sigma = 0.5 * factor if factor > 1 else 0.0
        self.target = sample(_smooth(target[None], sigma), full_w2i, self.points[None])[0]
        self.atlases = _smooth(atlases, sigma)
        self.atlas_w2i = atlas_w2i
        self.mask = None
        if mask is not None:
            m = sample(mask[None, None].float(), full_w2i, self.points[None])[0, 0]
            self.mask = m > 0.5
        spacing_matrix = np.asarray(self.geometry.direction).reshape(3, 3) @ np.diag(self.geometry.spacing)
        # maps a voxel displacement in MONAI channel order (z, y, x) to physical (x, y, z)
        self.voxel_to_mm = torch.as_tensor(spacing_matrix[:, ::-1].copy(), dtype=torch.float32, device=device)

    def affine_grid(self, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grid_sample coordinates of the affinely mapped level points (N, Z, Y, X, 3), and the (N, 3, 3) matrix
        taking a voxel displacement (z, y, x) of this level to grid_sample units.

        One combined (N, 4, 4) matrix takes level points straight to grid_sample coordinates:
        normalise . world_to_index(atlas) . affine.
        """
        shape = self.atlases.shape[2:]
        size_xyz = torch.tensor([shape[2], shape[1], shape[0]], dtype=affine.dtype, device=affine.device)
        norm = torch.diag(torch.cat([2.0 / (size_xyz - 1).clamp(min=1), affine.new_ones(1)]))
        norm[:3, 3] = -1.0
        combined = norm @ self.atlas_w2i @ affine                                   # (N, 4, 4)
        grid = torch.einsum("zyxc,nkc->nzyxk", self.points, combined[:, :3, :3])
        return grid + combined[:, None, None, None, :3, 3], combined[:, :3, :3] @ self.voxel_to_mm

    def warp(self, affine: torch.Tensor, ddf: torch.Tensor | None = None,
             grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Atlases warped onto this level's grid: (N, C, Z, Y, X); ``grid``: a cached :meth:`affine_grid`."""
        base, ddf_to_grid = grid if grid is not None else self.affine_grid(affine)
        if ddf is not None:
            base = base + torch.einsum("nczyx,nkc->nzyxk", ddf, ddf_to_grid)
        return F.grid_sample(self.atlases, base, mode="bilinear", padding_mode="border", align_corners=True)


def _affine_matrix(m: torch.Tensor, t: torch.Tensor, center: torch.Tensor, radius: float,
                   t0: torch.Tensor) -> torch.Tensor:
    """y = c + (I + M)(x - c) + R t + t0 as (N, 4, 4)."""
    n = m.shape[0]
    lin = torch.eye(3, device=m.device).expand(n, 3, 3) + m
    trans = center + radius * t + t0 - torch.einsum("nij,j->ni", lin, center)
    top = torch.cat([lin, trans[:, :, None]], dim=2)
    bottom = torch.tensor([0, 0, 0, 1.0], device=m.device).expand(n, 1, 4)
    return torch.cat([top, bottom], dim=1)


def _bound_scales(m: torch.Tensor, max_scale: float) -> None:
    """Project the linear parts I + M (N, 3, 3) whose singular values leave [1/max_scale, max_scale] onto that
    range, in place (the others are left untouched, bit for bit)."""
    with torch.no_grad():
        lin = torch.eye(3, dtype=m.dtype, device=m.device) + m
        u, s, vh = torch.linalg.svd(lin)
        outside = ((s < 1.0 / max_scale) | (s > max_scale)).any(dim=1)
        if bool(outside.any()):
            bounded = u @ torch.diag_embed(s.clamp(1.0 / max_scale, max_scale)) @ vh
            m[outside] = (bounded - torch.eye(3, dtype=m.dtype, device=m.device))[outside]


def register_batch(target: torch.Tensor, target_geometry: Geometry, atlases: Sequence[torch.Tensor],
                   atlas_geometries: Sequence[Geometry], settings: TorchRegistrationSettings,
                   mask: torch.Tensor | None = None, progress: ProgressFn | None = None) -> AffineDeformable:
    """Register N atlases to a target in one batched optimisation.

    Args:
        target: (C, Z, Y, X) normalised intensities on ``target_geometry`` (device decides where work runs).
        atlases: N tensors (C, Zk, Yk, Xk) normalised, each on its own geometry.
        mask: optional (Z, Y, X) bool target mask restricting the metric.
    """
    device = target.device
    n = len(atlases)
    base = 1
    while np.prod([int(np.ceil(s / base)) for s in target_geometry.size]) > settings.max_voxels:
        base *= 2
    levels = tuple(f * base for f in settings.levels)
    if not (len(settings.affine_iterations) == len(levels) == len(settings.deformable_iterations)):
        raise ValueError("affine_iterations and deformable_iterations need one entry per level")
    shape = [max(a.shape[i] for a in atlases) for i in range(1, 4)]
    batch = torch.stack([_pad_to(a.to(device).float(), shape) for a in atlases])
    atlas_w2i = torch.stack([torch.as_tensor(g.physical_to_index(), dtype=torch.float32)
                             for g in atlas_geometries]).to(device)
    metric_cache: dict[int, _Metric] = {}

    # Initialisation: translation t0 mapping centres (target -> atlas).
    center_np = target_geometry.center()
    if settings.init == "moments":
        t_com = _center_of_mass(target, target_geometry)
        t0 = np.stack([_center_of_mass(a.to(device), g) - t_com for a, g in zip(atlases, atlas_geometries)])
    elif settings.init == "center":
        t0 = np.stack([g.center() - center_np for g in atlas_geometries])
    elif settings.init == "identity":
        t0 = np.zeros((n, 3))
    else:
        raise ValueError(f"unknown init '{settings.init}': use moments, center or identity")
    t0 = torch.as_tensor(t0, dtype=torch.float32, device=device)
    center = torch.as_tensor(center_np, dtype=torch.float32, device=device)
    radius = float(np.mean(target_geometry.extent()) / 2.0)
    m = torch.zeros(n, 3, 3, device=device, requires_grad=True)
    t = torch.zeros(n, 3, device=device, requires_grad=True)

    total_work = sum(settings.affine_iterations) * settings.affine + sum(settings.deformable_iterations) * (
        settings.deformable)
    done = 0

    def report(msg: str) -> None:
        if progress is not None and total_work:
            progress(done / total_work, msg)

    level_data: dict[int, _Level] = {}

    def level(factor: int) -> _Level:
        if factor not in level_data:
            level_data[factor] = _Level(factor, target, target_geometry, batch, atlas_w2i, mask)
            metric_cache[factor] = _Metric(settings.metric, settings.lncc_radius, level_data[factor].mask)
        return level_data[factor]

    losses = torch.zeros(n)
    if settings.affine:
        for li, (factor, iters) in enumerate(zip(levels, settings.affine_iterations)):
            lv = level(factor)
            metric = metric_cache[factor]
            lr = settings.affine_lr / (2 ** li)
            opt = torch.optim.Adam([{"params": [m], "lr": lr}, {"params": [t], "lr": lr}])
            for it in range(iters):
                opt.zero_grad()
                warped = lv.warp(_affine_matrix(m, t, center, radius, t0))
                losses = metric(warped, lv.target.expand(n, *lv.target.shape))
                losses.sum().backward()
                opt.step()
                if settings.max_scale is not None:
                    _bound_scales(m, settings.max_scale)
                done += 1
                if it % 10 == 0:
                    report(f"affine level {li + 1}/{len(levels)}")
    affine = _affine_matrix(m, t, center, radius, t0).detach()

    if settings.model not in ("compositive", "svf"):
        raise ValueError(f"unknown deformation model '{settings.model}': use 'compositive' or 'svf'")
    exp = VelocityExponential(settings.svf_steps)
    state = None  # svf: velocity; compositive: displacement (N, 3, z, y, x) in level voxels
    if settings.deformable:
        for li, (factor, iters) in enumerate(zip(levels, settings.deformable_iterations)):
            lv = level(factor)
            metric = metric_cache[factor]
            lshape = lv.geometry.shape
            state = torch.zeros(n, 3, *lshape, device=device) if state is None else _resize_field(state, lshape)
            affine_grid = lv.affine_grid(affine) if iters else None  # constant while the field is optimised
            for it in range(iters):
                with torch.no_grad():
                    ddf = exp(state) if settings.model == "svf" else state.clone()
                ddf.requires_grad_(True)
                warped = lv.warp(affine, ddf, affine_grid)
                with torch.no_grad():  # metric gradient in closed form (LNCC); autograd only through the warp
                    losses, metric_grad = metric.value_and_gradient(warped.detach(),
                                                                    lv.target.expand(n, *lv.target.shape))
                (grad,) = torch.autograd.grad(warped, ddf, grad_outputs=metric_grad)
                with torch.no_grad():
                    grad = _smooth(grad, settings.sigma_pre)
                    peak = grad.square().sum(dim=1).reshape(n, -1).amax(dim=1).sqrt().clamp(min=1e-12)
                    delta = grad * (-settings.step / peak).reshape(n, 1, 1, 1, 1)
                    if settings.model == "svf":
                        state = state + delta
                    else:  # phi o (Id + delta): u(x) <- delta(x) + u(x + delta(x))
                        state = delta + exp.warp_field(state, delta)
                    state = _smooth(state, settings.sigma_post)
                done += 1
                if it % 10 == 0:
                    report(f"deformable level {li + 1}/{len(levels)}")
    else:
        state = torch.zeros(n, 3, *level(levels[-1]).geometry.shape, device=device)
    report("registration done")
    return AffineDeformable(affine, state.detach(), settings.model, level(levels[-1]).geometry,
                            [float(v) for v in losses.detach().cpu()])


def invert_displacement(u: torch.Tensor, iterations: int = 20,
                        exp: VelocityExponential | None = None) -> torch.Tensor:
    """Inverse of ``x -> x + u(x)`` by fixed-point iteration ``w(x) = -u(x + w(x))``; (N, 3, Z, Y, X) voxels."""
    exp = exp or VelocityExponential()
    w = -u
    for _ in range(iterations):
        w = -exp.warp_field(u, w)
    return w


def _resize_field(velocity: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Upsample a voxel-unit velocity or displacement (N, 3, z, y, x) to ``shape``, rescaling each component."""
    old = velocity.shape[2:]
    out = F.interpolate(velocity, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = torch.tensor([(s - 1) / max(o - 1, 1) for s, o in zip(shape, old)], device=velocity.device)
    return out * scale.reshape(1, 3, 1, 1, 1)


def fields_from_result(result: AffineDeformable, target_geometry: Geometry,
                       atlas_geometries: Sequence[Geometry], svf_steps: int = 7,
                       inverse_iterations: int = 20) -> list[tuple[DisplacementField, DisplacementField]]:
    """Forward (target grid) and inverse (atlas grid) physical displacement fields per atlas.

    The deformation is inverted on the working grid; fields on a coarser working grid are resampled in
    physical space onto the target grid.
    """
    device = result.velocity.device
    exp = VelocityExponential(svf_steps)
    working = result.working_geometry
    spacing_matrix = np.asarray(working.direction).reshape(3, 3) @ np.diag(working.spacing)
    voxel_to_mm = torch.as_tensor(spacing_matrix[:, ::-1].copy(), dtype=torch.float32, device=device)
    resample = not working.same_as(target_geometry)
    if resample:
        target_pts = grid_points(target_geometry, device)[None]
        working_w2i = torch.as_tensor(working.physical_to_index(), dtype=torch.float32, device=device)
    out = []
    with torch.no_grad():
        for k, atlas_geometry in enumerate(atlas_geometries):
            v = result.velocity[k : k + 1]
            if result.model == "svf":
                u_vox, u_inv_vox = exp(v), exp(-v)
            else:
                u_vox, u_inv_vox = v, invert_displacement(v, inverse_iterations, exp)
            u = torch.einsum("nczyx,kc->nkzyx", u_vox, voxel_to_mm)                 # (1, 3, z, y, x) mm
            u_inv = torch.einsum("nczyx,kc->nkzyx", u_inv_vox, voxel_to_mm)
            if resample:
                u = sample(u, working_w2i, target_pts)
                u_inv = sample(u_inv, working_w2i, target_pts)
            out.append(fields_from_affine_and_displacement(result.affine[k], u[0], u_inv[0], target_geometry,
                                                           atlas_geometry))
    return out


def settings_from(preset: str = "default", **overrides) -> TorchRegistrationSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown registration preset '{preset}': choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)
