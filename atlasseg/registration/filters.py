"""Fast separable filters for registration on CPU and GPU.

Box sums by cumulative sums cost O(1) per voxel whatever the window, about 10x less than the conv3d-based
separable filtering on CPU, which dominated registration time; windows up to 7 voxels wide use shifted in-place
adds instead (no padded copies). Gaussian smoothing is approximated by a cascade of three box filters
(central-limit theorem) whose widths best match the requested variance. The LNCC metric comes with its gradient
in closed form, so deformable registration needs autograd only through the warp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_sum(x: torch.Tensor, radius: int | tuple[int, int, int], pad_mode: str = "constant") -> torch.Tensor:
    """Sum over a (2r+1)^3 window of (B, C, Z, Y, X); outside is zero (``constant``) or replicated."""
    radii = (radius,) * 3 if isinstance(radius, int) else radius
    for dim, r in zip((2, 3, 4), radii):
        if r <= 0:
            continue
        n = x.shape[dim]
        if r <= 3 and n > r:  # shifted in-place adds, no padded copy: faster than pad + cumsum for small windows
            out = x.clone()
            for s in range(1, r + 1):
                out.narrow(dim, s, n - s).add_(x.narrow(dim, 0, n - s))
                out.narrow(dim, 0, n - s).add_(x.narrow(dim, s, n - s))
                if pad_mode == "replicate":
                    out.narrow(dim, 0, s).add_(x.narrow(dim, 0, 1))
                    out.narrow(dim, n - s, s).add_(x.narrow(dim, n - 1, 1))
            x = out
            continue
        pad = [0] * 6
        pad[(4 - dim) * 2] = r + 1
        pad[(4 - dim) * 2 + 1] = r
        c = F.pad(x, pad, mode=pad_mode).cumsum(dim)
        x = c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)
    return x


def _box_widths(sigma: float, passes: int = 3) -> list[int]:
    """Odd box widths whose summed variance sum((w^2 - 1) / 12) is closest to sigma^2."""
    target = sigma * sigma
    best, best_err = [1] * passes, float("inf")
    wmax = int(2 * sigma * 2) + 3
    for w1 in range(1, wmax + 1, 2):
        for w2 in range(1, w1 + 1, 2):
            for w3 in range(1, w2 + 1, 2):
                err = abs(sum((w * w - 1) / 12.0 for w in (w1, w2, w3)) - target)
                if err < best_err:
                    best, best_err = [w1, w2, w3], err
    return best


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Approximate Gaussian smoothing of (B, C, Z, Y, X) by ``sigma`` voxels (border values replicated)."""
    if sigma <= 0:
        return x
    for w in _box_widths(sigma):
        if w > 1:
            r = w // 2
            x = box_sum(x, r, pad_mode="replicate") / float(w ** 3)
    return x


def _lncc_terms(warped: torch.Tensor, target: torch.Tensor, radius: int, eps: float):
    """Window sums of T and I, cross term and clamped/raw variances (shared by the map and its gradient)."""
    target = target.expand_as(warped)
    n = float((2 * radius + 1) ** 3)
    stacked = torch.cat([target, warped, target * target, warped * warped, target * warped], dim=1)
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = box_sum(stacked, radius).chunk(5, dim=1)
    cross = tp_sum - p_sum * t_sum / n
    p_var_raw = p2_sum - p_sum * p_sum / n
    t_var = (t2_sum - t_sum * t_sum / n).clamp(min=eps)
    return n, t_sum, p_sum, cross, t_var, p_var_raw.clamp(min=eps), p_var_raw


def lncc(warped: torch.Tensor, target: torch.Tensor, radius: int = 2, eps: float = 1e-5) -> torch.Tensor:
    """Local squared normalised cross-correlation map in [0, 1] over (2r+1)^3 windows.

    Same quantity as MONAI's ``LocalNormalizedCrossCorrelationLoss`` (negated there), computed with box sums.
    Args: (B, C, Z, Y, X) each (``target`` may broadcast over B). Returns (B, C, Z, Y, X).
    """
    _, _, _, cross, t_var, p_var, _ = _lncc_terms(warped, target, radius, eps)
    return cross * cross / (t_var * p_var)


def lncc_with_gradient(warped: torch.Tensor, target: torch.Tensor, radius: int = 2, eps: float = 1e-5,
                       weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The :func:`lncc` map and, in closed form, the gradient of ``sum_x weight(x) * lncc(x)`` w.r.t. ``warped``.

    For a window w with n voxels, cc_w = cross^2 / (tvar * pvar) and
    d cc_w / d I(x) = a_w (T(x) - mean_w T) - b_w (I(x) - mean_w I), a_w = 2 cross / (tvar pvar), b_w = a_w cross /
    pvar; summing over the windows that hold x is another box sum (zero-padded box sums are self-adjoint). This
    replaces autograd through the cumulative sums (about a third of a deformable iteration on CPU).
    Args: (B, C, Z, Y, X) each (``target`` may broadcast over B); ``weight`` broadcasts to the map (a mask).
    Returns: (lncc map, gradient), both (B, C, Z, Y, X).
    """
    n, t_sum, p_sum, cross, t_var, p_var, p_var_raw = _lncc_terms(warped, target, radius, eps)
    cc = cross * cross / (t_var * p_var)
    a = 2.0 * cross / (t_var * p_var)
    b = torch.where(p_var_raw > eps, a * cross / p_var, torch.zeros_like(a))  # clamped variance: no gradient
    if weight is not None:
        a, b = a * weight, b * weight
    sums = box_sum(torch.cat([a, a * (t_sum / n), b, b * (p_sum / n)], dim=1), radius)
    sa, sat, sb, sbp = sums.chunk(4, dim=1)
    return cc, target.expand_as(warped) * sa - sat - warped * sb + sbp


class VelocityExponential:
    """Scaling and squaring of a stationary velocity field in voxel units.

    Same operation as MONAI's ``DVF2DDF`` (which re-creates its sampling grid on every warp; caching it here
    more than halves registration time on CPU). Fields are (N, 3, Z, Y, X) with channels (z, y, x) as in MONAI.
    """

    def __init__(self, steps: int = 7):
        self.steps = steps
        self._grid: torch.Tensor | None = None

    def _base(self, field: torch.Tensor) -> torch.Tensor:
        shape = field.shape[2:]
        if self._grid is None or self._grid.shape[1:4] != shape or self._grid.device != field.device:
            axes = [torch.linspace(-1.0, 1.0, n, device=field.device, dtype=field.dtype) for n in shape]
            zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
            self._grid = torch.stack([xx, yy, zz], dim=-1)[None]
        return self._grid

    def warp_field(self, field: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """``field`` sampled at ``x + ddf(x)`` (border padding)."""
        base = self._base(ddf)
        scale = torch.tensor([2.0 / max(n - 1, 1) for n in ddf.shape[2:]], device=ddf.device, dtype=ddf.dtype)
        offset = (ddf * scale.reshape(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1).flip(-1)  # -> (x, y, z)
        return F.grid_sample(field, base + offset, mode="bilinear", padding_mode="border", align_corners=True)

    def __call__(self, velocity: torch.Tensor) -> torch.Tensor:
        ddf = velocity / (2 ** self.steps)
        for _ in range(self.steps):
            ddf = ddf + self.warp_field(ddf, ddf)
        return ddf
