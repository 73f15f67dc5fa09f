"""Joint label fusion (Wang & Yushkevich 2013), vectorised in torch, following ANTs antsJointFusion.

What is reproduced from ANTs (itkWeightedVotingFusionImageFilter / NonLocalPatchBasedImageFilter,
the version bundled with antspyx 0.6; checked voxel by voxel against antspyx on small volumes):

* Patches are cubes of ``patch_radius`` (P voxels per modality). Voxels of a patch that fall
  outside the image are not used.
* Local search: for every atlas and target voxel x, every offset o of the ``search_radius`` cube
  with x+o inside the image is scored, visiting offsets in order of increasing physical distance
  (``spacing``) and keeping the first best one (strict improvement), like ANTs.
  - ``metric="pearson"`` (antsJointFusion's default, ``-m PC``): the target patch is z-scored
    (sample std, std < 1e-6 -> 1), the atlas patch is used raw, and the score is
    sign(s) s^2 / var_x with s = sum_k x_k y_k and var_x = sum x^2 - (sum x)^2/n (floored at 1e-6):
    the offset of largest positive correlation wins.
  - ``metric="msq"`` (antspyx's default, ``usecor=False``): mean squared difference of the raw
    patches.
  - fewer than 3 usable patch voxels: the offset is not eligible.
* Weights: target patch and best atlas patches are z-scored (as above, in both metrics);
  d_i = |a_i - t|; M_ij = (d_i . d_j / (P - 1)) ** beta; if a patch reaches outside the image
  its row and column of M are 0 (ANTs: NaN -> 0), if the target patch does, M = 0 (equal weights).
  w = (M + alpha I)^-1 1 by Cholesky (SVD pseudo-inverse when ill conditioned), negative weights
  set to 0 (the ANTs version in antspyx does this even without -c), then w /= sum(w).
  ``nonnegative=True`` uses non-negative least squares (Lawson-Hanson, as ANTs ``-c 1``) instead.
* Voting is spread over the patch ("Hongzhi's averaging"): target voxel x adds w_i to label
  L_i(y + o_i(x)) at every voxel y of its patch (y and y + o_i(x) inside the image). Posteriors are
  these sums divided by their total per voxel; the winner is the arg-max with ties going to the
  lowest label value (ANTs walks its std::set of labels with a strict '>').
* Mask: only target voxels inside the mask are centres (solve and vote); their votes may land on
  any voxel, but voxels outside the mask are reported as background.

Speed-ups that do not change the result (ANTs itself solves and searches at every voxel):

* ``skip_consensus=True`` (default): every vote that reaches a voxel y is an atlas label read
  inside the search cube around y. Where all atlases carry one label c in that cube (clipped to the
  image), y's posterior is one-hot c whatever the weights are, so it is set directly, and weights
  are solved only at centres with such a non-trivial voxel in their patch (i.e. whose
  patch_radius + search_radius cube holds more than one label). Identical result; the reported
  ``atlas_weights`` of the skipped centres are 1/N. ``skip_consensus=False`` solves everywhere in
  the mask (used by the tests to show the equality).
* The best offsets come from box filters over blocks of the grid (bounding boxes of the centres
  to solve, in z-slabs), one search offset at a time: per offset one box sum of T*A_o (Pearson) or
  of (T-A_o)^2 (MSQ); no loop over voxels. For Pearson the atlas window sums are shifted views of one
  box filter of the atlas per block, except for centres whose own patch leaves the image (they need
  per-offset sums over the clipped window). Scores are compared in an order-equivalent form
  (s / sqrt(var_x) instead of sign(s) s^2 / var_x) and computed from mean-centred intensities, in
  float32 with float64 per-block statistics; candidates whose scores agree to about 1e-6 relative
  may be ordered differently than in ANTs' double precision.
* Patch gathering, M, the batched solves and the voting run in chunks of ``chunk_size`` centres
  with flat-index arithmetic and reused buffers, so memory stays bounded (about 0.3 GB of work
  buffers at the default 8192 plus a few arrays the size of the atlas stack).

Deviation: a target patch that is exactly constant gives every Pearson score 0 in ANTs only when
the constant is 0 (z-scored zeros; otherwise rounding noise decides); here the centre offset is
taken for every constant target patch.

Output ``atlas_weights`` are the weights solved at each centre voxel (ANTs' optional voting-weight
images are instead patch averages of them).
"""

from __future__ import annotations

import math

import torch

from ..methods import JLF_DEFAULTS
from .voting import ProgressFn, as_triple, positive_float, report

JLF_PARAMS = (
    "alpha",
    "beta",
    "patch_radius",
    "search_radius",
    "metric",
    "nonnegative",
    "spacing",
    "skip_consensus",
    "chunk_size",
    "slab_size",
)

_EPS_STD = 1e-6  # ANTs: a patch std below this is replaced by 1
_EPS_VAR = 1e-6  # ANTs: floor of the atlas patch variance in the Pearson score


# ----------------------------------------------------------------------------------------------
# small array helpers
# ----------------------------------------------------------------------------------------------
def _box1(x: torch.Tensor, dim: int, rr: int) -> torch.Tensor:
    """Sum of 2*rr+1 consecutive elements along ``dim`` ('valid' mode), by doubling.

    Window sums of length 2^k are built by doubling and the window is assembled from them in a
    fixed order, so identical neighbourhoods give bit-identical sums (keeps ANTs' exact ties, e.g.
    flat regions, intact) with about log2(window) + popcount(window) additions per element.
    """
    w = 2 * rr + 1
    n = x.shape[dim] - 2 * rr
    if w == 1:
        return x
    pows = [x]  # pows[k][i] = sum of x[i : i + 2^k]
    while (1 << len(pows)) <= w:
        prev = pows[-1]
        half = 1 << (len(pows) - 1)
        m = prev.shape[dim] - half
        pows.append(prev.narrow(dim, 0, m) + prev.narrow(dim, half, m))
    out = None
    owned = False
    pos = 0
    for k in range(len(pows) - 1, -1, -1):
        if w & (1 << k):
            piece = pows[k].narrow(dim, pos, n)
            if out is None:
                out = piece
            elif owned:
                out.add_(piece)
            else:
                out = out + piece
                owned = True
            pos += 1 << k
    return out


def _box_valid(x: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    """Sum over a (2r+1)^3 window, 'valid' mode on the last three dims (each shrinks by 2r).

    The axis that shrinks most (relatively) is summed first, so thin blocks stay cheap.
    """
    dims = [(-3 + a, r[a]) for a in range(3) if r[a]]
    dims.sort(key=lambda t: (x.shape[t[0]] - 2 * t[1]) / x.shape[t[0]])
    for dim, rr in dims:
        x = _box1(x, dim, rr)
    return x


def _max_pool_same(x: torch.Tensor, r: tuple[int, int, int]) -> torch.Tensor:
    """Separable max over the (2r+1)^3 window clipped to the image, x (Z, Y, X) float."""
    y = x[None, None]
    for ax, rr in enumerate(r):
        if rr:
            k = [1, 1, 1]
            k[ax] = 2 * rr + 1
            pad = [0, 0, 0]
            pad[ax] = rr
            y = torch.nn.functional.max_pool3d(y, tuple(k), stride=1, padding=tuple(pad))
    return y[0, 0]


def _cube_offsets(r: tuple[int, int, int], device) -> torch.Tensor:
    """All offsets of the (2r+1)^3 cube in raster order (z slowest, x fastest), (K, 3) int64."""
    axes = [torch.arange(-rr, rr + 1, device=device) for rr in r]
    g = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([a.reshape(-1) for a in g], 1)


def _search_offsets(s: tuple[int, int, int], spacing: tuple[float, float, float], device) -> torch.Tensor:
    """Search offsets sorted by physical distance (ANTs order), ties kept in raster order."""
    offs = _cube_offsets(s, device)
    sp = torch.tensor(spacing, dtype=torch.float64, device=device)
    d2 = ((offs.to(torch.float64) * sp) ** 2).sum(1)
    order = torch.sort(d2, stable=True).indices
    return offs[order]


# ----------------------------------------------------------------------------------------------
# batched solvers
# ----------------------------------------------------------------------------------------------
def _solve_weights(mbar: torch.Tensor) -> torch.Tensor:
    """w = mbar^-1 1 for a batch (K, N, N) float64, Cholesky with SVD fallback (as ANTs)."""
    k, n, _ = mbar.shape
    ones = torch.ones((k, n, 1), dtype=mbar.dtype, device=mbar.device)
    chol, info = torch.linalg.cholesky_ex(mbar)
    diag = torch.diagonal(chol, dim1=-2, dim2=-1).abs()
    rcond = (diag.min(-1).values / diag.max(-1).values.clamp_min(1e-300)) ** 2
    good = (info == 0) & torch.isfinite(rcond) & (rcond > math.sqrt(torch.finfo(mbar.dtype).eps))
    w = torch.empty((k, n), dtype=mbar.dtype, device=mbar.device)
    if bool(good.all()):
        return torch.cholesky_solve(ones, chol).squeeze(-1)
    gi = good.nonzero().squeeze(1)
    bi = (~good).nonzero().squeeze(1)
    if gi.numel():
        w[gi] = torch.cholesky_solve(ones[gi], chol[gi]).squeeze(-1)
    w[bi] = (torch.linalg.pinv(mbar[bi], hermitian=True) @ ones[bi]).squeeze(-1)
    return w


def nnls_batched(a: torch.Tensor, y: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Lawson-Hanson non-negative least squares min ||a x - y||, x >= 0, for a batch.

    a (K, m, n), y (K, m); all problems iterate in lock-step with masks (3n outer iterations at
    most, like the Fortran reference and ANTs).
    """
    k, m, n = a.shape
    dt, dev = a.dtype, a.device
    at = a.transpose(1, 2)
    gram = at @ a  # (K, n, n)
    aty = (at @ y.unsqueeze(-1)).squeeze(-1)  # (K, n)
    eye = torch.eye(n, dtype=dt, device=dev).expand(k, n, n)
    x = torch.zeros((k, n), dtype=dt, device=dev)
    passive = torch.zeros((k, n), dtype=torch.bool, device=dev)
    running = torch.ones(k, dtype=torch.bool, device=dev)

    def restricted_lsq(p: torch.Tensor) -> torch.Tensor:
        pm = p.unsqueeze(-1) & p.unsqueeze(-2)
        g = torch.where(pm, gram, torch.zeros((), dtype=dt, device=dev)) + torch.where(
            p.unsqueeze(-1) | p.unsqueeze(-2), torch.zeros((), dtype=dt, device=dev), eye
        )
        rhs = torch.where(p, aty, torch.zeros((), dtype=dt, device=dev))
        sol = (torch.linalg.pinv(g, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)
        return torch.where(p, sol, torch.zeros((), dtype=dt, device=dev))

    for _ in range(3 * n):
        w = aty - (gram @ x.unsqueeze(-1)).squeeze(-1)
        cand = ~passive & running.unsqueeze(1)
        wm = torch.where(cand, w, torch.full_like(w, -math.inf))
        wmax, jmax = wm.max(1)
        running = running & (wmax > tol)
        if not bool(running.any()):
            break
        passive = passive | (torch.nn.functional.one_hot(jmax, n).bool() & running.unsqueeze(1))
        s = restricted_lsq(passive)
        for _inner in range(n):
            bad = running & ((s <= tol) & passive).any(1)
            if not bool(bad.any()):
                break
            sel = passive & (s <= tol)
            den = x - s
            ratio = torch.where(den > 0, x / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(x))
            ratio = torch.where(sel, ratio, torch.full_like(x, math.inf))
            step = ratio.min(1).values.clamp(0, 1)
            x = torch.where(bad.unsqueeze(1), x + step.unsqueeze(1) * (s - x), x)
            drop = bad.unsqueeze(1) & passive & (x.abs() < tol)
            passive = passive & ~drop
            s = restricted_lsq(passive)
        x = torch.where(running.unsqueeze(1), s, x)
    return x


# ----------------------------------------------------------------------------------------------
# the search for the best patch offsets
# ----------------------------------------------------------------------------------------------
class _Searcher:
    """Best search offset per atlas and centre voxel, one offset at a time over blocks of centres.

    Scores are kept in an order-equivalent, cheaper form than ANTs' (same arg-max):
    Pearson: s / sqrt(var_x) with s = sum_k x_k (t_k - mean_t) (the positive factor 1/std_t is
    dropped for one modality); MSQ: -(sum of squares) / n.
    """

    def __init__(self, target, atlases, r, s, offsets, metric):
        self.c = target.shape[0]
        self.n = atlases.shape[0]
        self.dims = tuple(target.shape[1:])
        self.r, self.s = r, s
        self.pad = tuple(rr + ss for rr, ss in zip(r, s, strict=True))
        self.offsets = offsets.tolist()
        self.metric = metric
        pz, py, px = self.pad
        padding = (px, px, py, py, pz, pz)
        t32 = target.to(torch.float32)
        self.tpad = torch.nn.functional.pad(t32, padding)
        self.apad = torch.nn.functional.pad(atlases.to(torch.float32), padding)
        self.dev = target.device
        if metric == "pearson":
            # Pearson sums are formed from the target minus its mean (exactly compensated below):
            # smaller products, less float32 cancellation. Outside the image the value stays 0.
            self.tmean = t32.mean(dim=(1, 2, 3))  # (C,)
            self.tpad_c = torch.nn.functional.pad(t32 - self.tmean.view(-1, 1, 1, 1), padding)
            self.amean = atlases.to(torch.float32).mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1)  # (N,1,1,1,1)

    def _axis_tables(self, axis, lo, hi):
        """Per-axis tables for centres lo..hi-1: joint usable counts and 'centre+o inside' flags
        per search offset, and the image indicator of window input positions."""
        d, r, s = self.dims[axis], self.r[axis], self.s[axis]
        v = torch.arange(lo, hi, device=self.dev)
        o = torch.arange(-s, s + 1, device=self.dev)
        p = torch.arange(-r, r + 1, device=self.dev)
        u = v[None, :, None] + p[None, None, :]  # (1, B, 2r+1)
        w = u + o[:, None, None]  # (2s+1, B, 2r+1)
        joint = ((u >= 0) & (u < d) & (w >= 0) & (w < d)).sum(-1)  # (2s+1, B)
        valid = ((v[None, :] + o[:, None]) >= 0) & ((v[None, :] + o[:, None]) < d)
        ui = torch.arange(lo - r, hi + r, device=self.dev)
        inimg = (ui >= 0) & (ui < d)
        uo = ui[None, :] + o[:, None]
        pair = inimg[None, :] & (uo >= 0) & (uo < d)  # (2s+1, B+2r): u and u+o inside
        return joint.to(torch.float32), valid, inimg.to(torch.float32), pair.to(torch.float32)

    def run_block(self, lo, hi, exact, out_idx):
        (z0, y0, x0), (z1, y1, x1) = lo, hi
        r, s, pad = self.r, self.s, self.pad
        n, c = self.n, self.c
        bz, by, bx = z1 - z0, y1 - y0, x1 - x0
        tz, ty, tx = (self._axis_tables(a, lo[a], hi[a]) for a in range(3))
        sl = (
            slice(z0 - r[0] + pad[0], z1 + r[0] + pad[0]),
            slice(y0 - r[1] + pad[1], y1 + r[1] + pad[1]),
            slice(x0 - r[2] + pad[2], x1 + r[2] + pad[2]),
        )
        treg = self.tpad[(slice(None),) + sl]  # (C, bz+2r, by+2r, bx+2r)

        def outer3(a, b, cc):
            return a[:, None, None] * b[None, :, None] * cc[None, None, :]

        pearson = self.metric == "pearson"
        if pearson:
            # target window mean / std over the voxels inside the image (float64 for accuracy)
            t64 = treg.to(torch.float64)
            n_t = outer3(tz[0][s[0]], ty[0][s[1]], tx[0][s[2]]).to(torch.float64)
            mu = _box_valid(t64, r) / n_t
            var = ((_box_valid(t64 * t64, r) - n_t * mu * mu) / (n_t - 1).clamp_min(1)).clamp_min(0)
            sd = torch.sqrt(var)
            flat = (sd < _EPS_STD).all(0)  # (bz, by, bx): constant target patch
            sd = torch.where(sd < _EPS_STD, torch.ones_like(sd), sd)
            mu_c = (mu - self.tmean.view(-1, 1, 1, 1).to(torch.float64)).to(torch.float32)  # (C, ...)
            inv_sd = (1.0 / sd).to(torch.float32) if c > 1 else None
            del t64, n_t, var, sd
            treg_c = self.tpad_c[(slice(None),) + sl]
            if not exact:
                # centres whose own window is inside the image: the atlas window sums depend on
                # w = centre + o only -> one box filter of the atlas per block (float64 here)
                asl = (
                    slice(None),
                    slice(None),
                    slice(z0 - r[0] - s[0] + pad[0], z1 + r[0] + s[0] + pad[0]),
                    slice(y0 - r[1] - s[1] + pad[1], y1 + r[1] + s[1] + pad[1]),
                    slice(x0 - r[2] - s[2] + pad[2], x1 + r[2] + s[2] + pad[2]),
                )
                areg = self.apad[asl].to(torch.float64)
                box_a64 = _box_valid(areg, r)  # (N, C, bz+2s, by+2s, bx+2s)
                box_a2 = _box_valid(areg.mul_(areg), r).sum(1)
                del areg
                # usable voxels of the window at w: those inside the image
                cw = [self._count_inside(a, (z0, y0, x0)[a] - s[a], (z1, y1, x1)[a] + s[a]) for a in range(3)]
                cnt_w = c * outer3(*cw).to(torch.float64)
                sum_x = box_a64.sum(1)
                var_w = (box_a2 - sum_x * sum_x / cnt_w.clamp_min(1)).clamp_min(_EPS_VAR)
                isd_w = torch.rsqrt(var_w).to(torch.float32)  # (N, bz+2s, by+2s, bx+2s)
                # w outside the image is not a candidate: NaN scores never win (gt / fmax below)
                w_in = outer3(*self._inside(lo, hi))
                isd_w.masked_fill_(~w_in, math.nan)
                box_a = box_a64.to(torch.float32)
                del box_a2, sum_x, var_w, w_in, box_a64, cnt_w
                if c == 1:
                    box_a = box_a[:, 0]

        best = torch.full((n, bz, by, bx), -math.inf, dtype=torch.float32, device=self.dev)
        best_idx = torch.zeros((n, bz, by, bx), dtype=torch.int16, device=self.dev)
        for j, (oz, oy, ox) in enumerate(self.offsets):
            iz, iy, ix = oz + s[0], oy + s[1], ox + s[2]
            vz, vy, vx = tz[1][iz], ty[1][iy], tx[1][ix]
            cz, cy, cx = tz[0][iz], ty[0][iy], tx[0][ix]
            if not (bool(vz.any()) and bool(vy.any()) and bool(vx.any())):
                continue
            all_valid = bool(vz.all()) and bool(vy.all()) and bool(vx.all())
            full = (2 * r[0] + 1, 2 * r[1] + 1, 2 * r[2] + 1)
            const_cnt = bool((cz == full[0]).all()) and bool((cy == full[1]).all()) and bool((cx == full[2]).all())
            ash = self.apad[
                :,
                :,
                sl[0].start + oz : sl[0].stop + oz,
                sl[1].start + oy : sl[1].stop + oy,
                sl[2].start + ox : sl[2].stop + ox,
            ]
            if not pearson:
                diff = treg - ash
                sq = diff.mul_(diff)
                sq = sq.sum(1) if c > 1 else sq[:, 0]
                if not const_cnt:  # some u or u + o outside the image
                    sq.mul_(outer3(tz[3][iz], ty[3][iy], tx[3][ix]))
                score = _box_valid(sq, r)
                if const_cnt:
                    score.neg_()
                else:
                    score = score.div_(outer3(cz, cy, cx) * (-float(c)))
            elif not exact:
                sxy = _box_valid(treg_c * ash, r)  # (N, C, bz, by, bx)
                wsl = (slice(iz, iz + bz), slice(iy, iy + by), slice(ix, ix + bx))
                if c == 1:
                    score = torch.addcmul(sxy[:, 0], mu_c[0], box_a[(slice(None),) + wsl], value=-1.0)
                else:
                    num = torch.addcmul(sxy, mu_c, box_a[(slice(None), slice(None)) + wsl], value=-1.0)
                    score = num.mul_(inv_sd).sum(1)
                score.mul_(isd_w[(slice(None),) + wsl])
            else:
                # one box filter call for the three sums: T*A, and A minus its (per-atlas) mean and
                # its square where both u and u+o are inside (same variance, less cancellation)
                stack = torch.empty((3,) + tuple(ash.shape), dtype=torch.float32, device=self.dev)
                torch.mul(treg_c, ash, out=stack[0])
                torch.sub(ash, self.amean, out=stack[1])
                stack[1].mul_(outer3(tz[3][iz], ty[3][iy], tx[3][ix]))
                torch.mul(stack[1], stack[1], out=stack[2])
                sxy, sx, sx2 = _box_valid(stack, r).unbind(0)
                del stack
                cnt1 = outer3(cz, cy, cx)
                sx_raw = torch.addcmul(sx, self.amean, cnt1)  # sum of the raw atlas values
                num = torch.addcmul(sxy, mu_c, sx_raw, value=-1.0)
                if c > 1:
                    num = num.mul_(inv_sd).sum(1)
                    sx, sx2 = sx.sum(1), sx2.sum(1)
                else:
                    num, sx, sx2 = num[:, 0], sx[:, 0], sx2[:, 0]
                cnt = float(c) * cnt1
                varx = torch.addcmul(sx2, sx, sx / cnt.clamp_min(1), value=-1.0).clamp_min_(_EPS_VAR)
                score = num.mul_(varx.rsqrt_())
                score.masked_fill_(cnt < 3, -math.inf)
            if not all_valid and (exact or not pearson):
                self._fill_invalid(score, lo, hi, (oz, oy, ox))
            better = score > best
            best = torch.fmax(best, score)
            best_idx.masked_fill_(better, j)
        if pearson:
            # constant target patch: every score is 0 in ANTs (z-scored zeros), the first offset
            # (the centre) wins
            best_idx.masked_fill_(flat.unsqueeze(0), 0)
        out_idx[:, z0:z1, y0:y1, x0:x1] = best_idx

    def _fill_invalid(self, score, lo, hi, o):
        """-inf where centre + o leaves the image: thin slabs at the block faces."""
        for a in range(3):
            d = self.dims[a]
            nlow = min(max(0, -o[a] - lo[a]), hi[a] - lo[a])  # centres v with v + o < 0
            nhigh = min(max(0, hi[a] + o[a] - d), hi[a] - lo[a])  # centres v with v + o >= d
            dim = score.dim() - 3 + a
            if nlow:
                score.narrow(dim, 0, nlow).fill_(-math.inf)
            if nhigh:
                score.narrow(dim, hi[a] - lo[a] - nhigh, nhigh).fill_(-math.inf)

    def _inside(self, lo, hi):
        """Per axis: 1 where w = lo-s .. hi+s-1 lies inside the image."""
        out = []
        for a in range(3):
            w = torch.arange(lo[a] - self.s[a], hi[a] + self.s[a], device=self.dev)
            out.append((w >= 0) & (w < self.dims[a]))
        return out

    def _count_inside(self, axis, lo, hi):
        """Number of window voxels inside the image for window centres lo..hi-1 along ``axis``."""
        d, r = self.dims[axis], self.r[axis]
        w = torch.arange(lo, hi, device=self.dev)
        a = torch.clamp(w - r, min=0)
        b = torch.clamp(w + r, max=d - 1)
        return (b - a + 1).clamp_min(0).to(torch.float32)


def _split_box(lo, hi, inner_lo, inner_hi):
    """Split box [lo, hi) into its part inside [inner_lo, inner_hi) and up to 6 boxes around it."""
    ilo = [max(a, b) for a, b in zip(lo, inner_lo, strict=True)]
    ihi = [min(a, b) for a, b in zip(hi, inner_hi, strict=True)]
    if any(a >= b for a, b in zip(ilo, ihi, strict=True)):
        return None, [(tuple(lo), tuple(hi))]
    rest = []
    cur_lo, cur_hi = list(lo), list(hi)
    for ax in range(3):
        if cur_lo[ax] < ilo[ax]:
            b_hi = list(cur_hi)
            b_hi[ax] = ilo[ax]
            rest.append((tuple(cur_lo), tuple(b_hi)))
        if ihi[ax] < cur_hi[ax]:
            b_lo = list(cur_lo)
            b_lo[ax] = ihi[ax]
            rest.append((tuple(b_lo), tuple(cur_hi)))
        cur_lo[ax], cur_hi[ax] = ilo[ax], ihi[ax]
    return (tuple(ilo), tuple(ihi)), rest


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------
def joint_label_fusion(
    target: torch.Tensor,
    atlas_images: torch.Tensor,
    label_index: torch.Tensor,
    num_labels: int,
    mask: torch.Tensor | None = None,
    alpha: float = JLF_DEFAULTS["alpha"],
    beta: float = JLF_DEFAULTS["beta"],
    patch_radius=JLF_DEFAULTS["patch_radius"],
    search_radius=JLF_DEFAULTS["search_radius"],
    metric: str = "pearson",
    nonnegative: bool = False,
    spacing=None,
    skip_consensus: bool = True,
    chunk_size: int = 8192,
    slab_size: int | None = None,
    progress: ProgressFn = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint label fusion. Returns posteriors (L, Z, Y, X) float32 and weights (N, Z, Y, X) float32.

    ``label_index`` holds label indices 0..L-1. Voxels outside ``mask`` get zero posteriors here
    (the caller turns them into background).
    """
    alpha = positive_float(alpha, "alpha")
    beta = positive_float(beta, "beta")
    r = as_triple(patch_radius, "patch_radius", minimum=1)
    s = as_triple(search_radius, "search_radius", minimum=0)
    metric = {"pc": "pearson", "msq": "msq", "pearson": "pearson"}.get(str(metric).lower(), None) or metric
    if metric not in ("pearson", "msq"):
        raise ValueError(f"metric must be 'pearson' or 'msq', got {metric!r}")
    if spacing is None:
        spacing = (1.0, 1.0, 1.0)
    try:
        spacing = tuple(float(v) for v in spacing)
    except TypeError:
        raise ValueError(f"spacing must be 3 numbers (z, y, x), got {spacing!r}") from None
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    if int(chunk_size) < 1 or (slab_size is not None and int(slab_size) < 1):
        raise ValueError("chunk_size and slab_size must be >= 1")
    chunk_size = int(chunk_size)
    slab_size = None if slab_size is None else int(slab_size)
    if not isinstance(nonnegative, bool) or not isinstance(skip_consensus, bool):
        raise ValueError("nonnegative and skip_consensus must be True or False")

    dev = target.device
    c = target.shape[0]
    n = atlas_images.shape[0]
    dims = tuple(target.shape[1:])
    Z, Y, X = dims
    V = Z * Y * X
    nl = num_labels
    offsets = _search_offsets(s, spacing, dev)
    if len(offsets) > 32767:
        raise ValueError("search_radius too large")
    poffs = _cube_offsets(r, dev)
    P = poffs.shape[0]
    if mask is None:
        mask = torch.ones(dims, dtype=torch.bool, device=dev)

    # -------- voxels whose posterior does not depend on any weight --------
    # Every vote reaching voxel y is an atlas label read inside the search cube around y
    # (y + o_i(x)). Where all atlases hold one label c in that cube (clipped to the image), y's
    # posterior is one-hot c whatever the weights, and a centre x needs its weights only when some
    # voxel of its patch is not fixed that way. Identical to solving everywhere (ANTs).
    R = tuple(a + b for a, b in zip(r, s, strict=True))
    if skip_consensus:
        hi_s = _max_pool_same(label_index.max(0).values.to(torch.float32), s)
        lo_s = -_max_pool_same(-label_index.min(0).values.to(torch.float32), s)
        fixed = hi_s == lo_s
        fixed_label = hi_s.to(torch.long)
        del hi_s, lo_s
        solve_mask = mask & (_max_pool_same((~fixed).to(torch.float32), r) > 0)
    else:
        fixed = None
        fixed_label = None
        solve_mask = mask

    posts = torch.zeros((nl, V), dtype=torch.float32, device=dev)
    wsum = torch.zeros(V, dtype=torch.float32, device=dev)
    weights = torch.full((n, V), 1.0 / n, dtype=torch.float32, device=dev)

    centres = solve_mask.reshape(-1).nonzero().squeeze(1)
    nc = centres.numel()
    report(progress, 0.02, f"JLF: {nc} of {int(mask.sum())} voxels need weights")
    if nc == 0:
        report(progress, 1.0, "JLF: done")
        return _finish(posts, wsum, weights, dims, nl, n, fixed, fixed_label)

    # -------- search: best offset index per atlas and centre --------
    best = torch.zeros((n, Z, Y, X), dtype=torch.int16, device=dev)
    if len(offsets) > 1:
        lo, hi = _bbox(solve_mask, (0, 0, 0), dims)
        searcher = _Searcher(target, atlas_images, r, s, offsets, metric)
        if metric == "pearson":
            inner, rest = _split_box(lo, hi, list(r), [d - rr for d, rr in zip(dims, r, strict=True)])
            blocks = ([] if inner is None else [(inner, False)]) + [(b, True) for b in rest]
        else:
            blocks = [((tuple(lo), tuple(hi)), True)]
        if slab_size is None:
            slab_size = max(1, (1 << 21) // max(1, n * c * (hi[1] - lo[1] + 2 * r[1]) * (hi[2] - lo[2] + 2 * r[2])))
        slabs = []
        for (blo, bhi), exact in blocks:
            for z in range(blo[0], bhi[0], slab_size):
                box = _bbox(solve_mask, (z, blo[1], blo[2]), (min(z + slab_size, bhi[0]), bhi[1], bhi[2]))
                if box is not None:
                    slabs.append((box[0], box[1], exact))
        total = sum((b[1][0] - b[0][0]) * (b[1][1] - b[0][1]) * (b[1][2] - b[0][2]) for b in slabs)
        done = 0
        for slo, shi, exact in slabs:
            searcher.run_block(slo, shi, exact, best)
            done += (shi[0] - slo[0]) * (shi[1] - slo[1]) * (shi[2] - slo[2])
            report(progress, 0.02 + 0.58 * done / total, "JLF: patch search")
        del searcher

    # -------- padded flat arrays for gathers --------
    pz, py, px = R
    Zp, Yp, Xp = Z + 2 * pz, Y + 2 * py, X + 2 * px
    Vp = Zp * Yp * Xp
    padding = (px, px, py, py, pz, pz)
    # atlas intensities stored (C, N, Vp) so that atlas i, channel ch sits at ch*N*Vp + i*Vp and the
    # label index (i*Vp + pos) is the channel-0 intensity index
    tflat = torch.nn.functional.pad(target.to(torch.float32), padding).reshape(-1)  # (C*Vp)
    aflat = torch.nn.functional.pad(atlas_images.to(torch.float32).transpose(0, 1), padding).reshape(-1)
    # labels padded with a dummy index nl ("outside the image"), voted into a discarded channel
    lab_dtype = torch.int16 if nl < 32000 else torch.int32
    lflat = torch.full((n, Zp, Yp, Xp), nl, dtype=lab_dtype, device=dev)
    lflat[:, pz : pz + Z, py : py + Y, px : px + X] = label_index.to(lab_dtype)
    lflat = lflat.reshape(-1)  # (N*Vp)
    idx_dtype = torch.int32 if max(c * n * Vp, (nl + 1) * (V + 1)) < 2**31 - 1 else torch.int64
    strides = torch.tensor([Yp * Xp, Xp, 1], device=dev)
    poff_flat = (poffs * strides).sum(1).to(idx_dtype)  # (P,) in the padded grid
    poff_img = (poffs * torch.tensor([Y * X, X, 1], device=dev)).sum(1)  # (P,) in the image grid
    soff_flat = (offsets * strides).sum(1)  # (S,)
    dims_t = torch.tensor(dims, device=dev)
    rt = torch.tensor(r, device=dev)
    Rt = torch.tensor(R, device=dev)
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    best_flat = best.reshape(n, -1)
    pdiv = float(P - 1)
    atlas_base = torch.arange(n, device=dev).view(1, n) * Vp  # (1, N)
    chan_base = (torch.arange(c, device=dev) * (n * Vp)).to(idx_dtype).view(1, 1, c, 1)
    # vote buffer with a dummy voxel V (votes landing outside the image) and dummy label nl
    votes = torch.zeros((nl + 1) * (V + 1), dtype=torch.float32, device=dev)

    # work buffers reused by every chunk (fresh 10^7-element temporaries per chunk would cost a
    # page-fault storm on CPU)
    kmax = min(chunk_size, nc)
    aidx_buf = torch.empty(kmax * n * P, dtype=idx_dtype, device=dev)
    ap_buf = torch.empty(kmax * n * c * P, dtype=torch.float32, device=dev)
    labs_buf = torch.empty(kmax * n * P, dtype=lab_dtype, device=dev)
    tgt_buf = torch.empty(kmax * n * P, dtype=torch.int64, device=dev)
    src_buf = torch.empty(kmax * n * P, dtype=torch.float32, device=dev)

    for k0 in range(0, nc, chunk_size):
        cidx = centres[k0 : k0 + chunk_size]
        K = cidx.numel()
        KNP = K * n * P
        zyx = torch.stack(torch.unravel_index(cidx, dims), 1)  # (K, 3)
        base = ((zyx + Rt) * strides).sum(1)  # padded flat index of the centre, (K,)
        bidx = best_flat[:, cidx].t().long()  # (K, N)
        mpos = zyx.unsqueeze(1) + offsets[bidx]  # (K, N, 3) matched atlas patch centres
        # patch validity (ANTs: any voxel of a patch outside the image zeroes its row/column of M)
        t_ok = ((zyx - rt >= 0) & (zyx + rt < dims_t)).all(1)  # (K,)
        a_ok = ((mpos - rt >= 0) & (mpos + rt < dims_t)).all(2)  # (K, N)
        del mpos
        mbase = (base.unsqueeze(1) + soff_flat[bidx] + atlas_base).to(idx_dtype).contiguous()  # (K, N)
        aidx = aidx_buf[:KNP].view(K, n, P)
        torch.add(mbase.view(K, n, 1), poff_flat.view(1, 1, P), out=aidx)  # atlas i, channel 0

        # z-scored target patches (K, 1, C, P) and matched atlas patches (K, N, C, P)
        tidx = (base.to(idx_dtype).view(K, 1, 1, 1) + (chan_base // n) + poff_flat.view(1, 1, 1, P)).view(-1)
        tp = _zscore_(tflat.index_select(0, tidx).view(K, 1, c, P))
        del tidx
        ap = ap_buf[: KNP * c].view(K, n, c, P)
        if c == 1:
            torch.index_select(aflat, 0, aidx.view(-1), out=ap_buf[:KNP])
        else:
            torch.index_select(aflat, 0, (aidx.unsqueeze(2) + chan_base).view(-1), out=ap_buf[: KNP * c])
        ap = _zscore_(ap)
        diff = ap.sub_(tp).abs_().view(K, n, c * P)
        del tp
        m = torch.bmm(diff, diff.transpose(1, 2)).to(torch.float64) / pdiv
        del diff, ap
        if beta == 2.0:
            m = m * m
        elif beta != 1.0:
            m = m.pow(beta)
        m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
        okm = (a_ok & t_ok.unsqueeze(1)).to(torch.float64)  # (K, N)
        m = m * okm.unsqueeze(2) * okm.unsqueeze(1)
        mbar = m + alpha * eye
        if nonnegative:
            w = nnls_batched(mbar, torch.ones((K, n), dtype=torch.float64, device=dev))
        else:
            w = _solve_weights(mbar).clamp_min(0)
        tot = w.sum(1, keepdim=True)
        w = torch.where(tot > 0, w / tot.clamp_min(1e-300), torch.full_like(w, 1.0 / n)).to(torch.float32)
        weights[:, cidx] = w.t()

        # -------- voting spread over the patch (ANTs: label at y + o_i for every y of the patch) ----
        labs = labs_buf[:KNP]
        torch.index_select(lflat, 0, aidx.view(-1), out=labs)
        u = zyx.unsqueeze(1) + poffs.unsqueeze(0)  # (K, P, 3) voxels receiving the votes
        u_ok = ((u >= 0) & (u < dims_t)).all(2)  # (K, P)
        uidx = (cidx.unsqueeze(1) + poff_img.unsqueeze(0)).masked_fill_(~u_ok, V)  # (K, P)
        del u, u_ok
        tgt = tgt_buf[:KNP]
        tgt.copy_(labs)
        tgt.mul_(V + 1).view(K, n, P).add_(uidx.unsqueeze(1))
        del uidx
        src = src_buf[:KNP]
        src.view(K, n, P).copy_(w.unsqueeze(-1).expand(K, n, P))
        votes.scatter_add_(0, tgt, src)
        report(progress, 0.6 + 0.4 * min(k0 + K, nc) / nc, "JLF: weights and voting")
    del aidx_buf, ap_buf, labs_buf, tgt_buf, src_buf

    votes = votes.view(nl + 1, V + 1)[:nl, :V]
    posts += votes
    wsum += votes.sum(0)
    del votes
    report(progress, 1.0, "JLF: done")
    return _finish(posts, wsum, weights, dims, nl, n, fixed, fixed_label)


def _zscore_(x: torch.Tensor) -> torch.Tensor:
    """In-place z-score along the last dim, sample std; std < 1e-6 -> 1 (ANTs)."""
    x.sub_(x.mean(-1, keepdim=True))
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True).div_(math.sqrt(max(x.shape[-1] - 1, 1)))
    ss = torch.where(ss < _EPS_STD, torch.ones_like(ss), ss)
    return x.div_(ss)


def _finish(posts, wsum, weights, dims, nl, n, fixed, fixed_label):
    has = wsum > 0
    posts = torch.where(has.unsqueeze(0), posts / wsum.clamp_min(1e-30).unsqueeze(0), posts)
    posts = posts.reshape((nl,) + dims)
    if fixed is not None:
        onehot = torch.zeros_like(posts).scatter_(0, fixed_label.unsqueeze(0), 1.0)
        posts = torch.where(fixed.unsqueeze(0), onehot, posts)
    return posts, weights.reshape((n,) + dims)


def _bbox(m: torch.Tensor, lo, hi):
    """Bounding box [lo', hi') of the True voxels of m inside [lo, hi), or None."""
    sub = m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    out_lo, out_hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = sub.any(dim=other).nonzero()
        if idx.numel() == 0:
            return None
        out_lo.append(lo[ax] + int(idx[0]))
        out_hi.append(lo[ax] + int(idx[-1]) + 1)
    return tuple(out_lo), tuple(out_hi)
