"""Tests of atlasseg.fusion: hand-built cases with known answers, and JLF against a literal
(slow, loop-based) re-statement of ANTs antsJointFusion semantics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasseg.fusion import METHODS, FusionResult, atlas_agreement, fuse, oracle_coverage
from atlasseg.fusion.jlf import nnls_batched

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def smooth_field(shape, rng, passes=3):
    """Smooth random field in [0, 1] (box blur of noise, numpy only)."""
    x = rng.standard_normal(shape)
    for _ in range(passes):
        for ax in range(3):
            x = (np.roll(x, 1, ax) + x + np.roll(x, -1, ax)) / 3.0
    x -= x.min()
    return x / x.max()


def t(a, dtype=None):
    out = torch.from_numpy(np.ascontiguousarray(a))
    return out if dtype is None else out.to(dtype)


def check_result(res: FusionResult, labels, shape, n_atlases, weights_expected):
    assert res.segmentation.shape == shape and res.segmentation.dtype == torch.int64
    assert res.posteriors.shape == (len(labels),) + shape and res.posteriors.dtype == torch.float32
    assert set(torch.unique(res.segmentation).tolist()) <= set(labels)
    torch.testing.assert_close(res.posteriors.sum(0), torch.ones(shape), atol=1e-5, rtol=0)
    assert float(res.posteriors.min()) >= -1e-7
    if weights_expected:
        assert res.atlas_weights.shape == (n_atlases,) + shape
        torch.testing.assert_close(res.atlas_weights.sum(0), torch.ones(shape), atol=1e-5, rtol=0)
        assert float(res.atlas_weights.min()) >= -1e-7
    else:
        assert res.atlas_weights is None


# ------------------------------------------------------------------------------------------------
# majority voting
# ------------------------------------------------------------------------------------------------
def test_majority_known_map_tie_rule_and_label_values():
    labels = [0, 7, 42]
    a = np.array(
        [
            [[[0, 7, 42, 7, 0, 42]]],
            [[[0, 7, 42, 42, 7, 0]]],
            [[[7, 7, 0, 0, 42, 7]]],
        ]
    )  # (3, 1, 1, 6)
    res = fuse("majority", None, None, t(a), labels)
    # columns: 2x0 | 3x7 | 2x42 | 1/1/1 tie | 1/1/1 tie | 1/1/1 tie  -> ties go to the lowest label
    assert res.segmentation[0, 0].tolist() == [0, 7, 42, 0, 0, 0]
    expected_post = (
        np.array(
            [
                [2, 0, 1, 1, 1, 1],  # votes for 0
                [1, 3, 0, 1, 1, 1],  # votes for 7
                [0, 0, 2, 1, 1, 1],  # votes for 42
            ]
        )
        / 3.0
    )
    np.testing.assert_allclose(res.posteriors[:, 0, 0].numpy(), expected_post, atol=1e-7)
    check_result(res, labels, (1, 1, 6), 3, weights_expected=False)
    assert res.method == "majority" and res.labels == labels


def test_majority_matches_simpleitk_label_voting_except_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=(4, 5, 6, 7))
    res = fuse("majority", None, None, t(a), [0, 1, 2])
    f = sitk.LabelVotingImageFilter()
    f.SetLabelForUndecidedPixels(255)
    ref = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(x.astype(np.uint8)) for x in a]))
    seg = res.segmentation.numpy()
    decided = ref != 255
    assert decided.sum() > 50 and (~decided).sum() > 20
    np.testing.assert_array_equal(seg[decided], ref[decided])
    # at ties: the lowest of the tied labels
    counts = np.stack([(a == lab).sum(0) for lab in range(3)])
    lowest_tied = np.argmax(counts == counts.max(0), axis=0)
    np.testing.assert_array_equal(seg[~decided], lowest_tied[~decided])


def test_decision_antspyx_rule():
    # 5 atlases: 2 x background, 2 x label 7, 1 x label 42 -> arg-max ties 0/7 -> 0;
    # antspyx rule: foreground (3/5) beats background (2/5) -> best foreground label 7
    a = np.array([0, 0, 7, 7, 42]).reshape(5, 1, 1, 1)
    assert int(fuse("majority", None, None, t(a), [0, 7, 42]).segmentation) == 0
    assert int(fuse("majority", None, None, t(a), [0, 7, 42], decision="antspyx").segmentation) == 7


# ------------------------------------------------------------------------------------------------
# locally weighted voting
# ------------------------------------------------------------------------------------------------
def _wrong_majority_case(rng, shape=(12, 12, 12)):
    """Target image + 3 atlases: atlas 0 = the target (right labels), atlases 1 and 2 have other
    images and label a cube 2 where the truth is 1."""
    img = smooth_field(shape, rng)
    truth = np.zeros(shape, np.int64)
    truth[3:9, 3:9, 3:9] = 1
    wrong = truth.copy()
    wrong[4:8, 4:8, 4:8] = 2
    images = np.stack([img, smooth_field(shape, rng), smooth_field(shape, rng)])[:, None]
    labels = np.stack([truth, wrong, wrong])
    return img[None].astype(np.float32), images.astype(np.float32), labels, truth


@pytest.mark.parametrize("similarity", ["msd", "ncc"])
def test_weighted_follows_the_matching_atlas(similarity):
    rng = np.random.default_rng(1)
    target, images, labels, truth = _wrong_majority_case(rng)
    region = np.zeros(truth.shape, bool)
    region[4:8, 4:8, 4:8] = True
    mv = fuse("majority", t(target), t(images), t(labels), [0, 1, 2]).segmentation.numpy()
    assert (mv[region] == 2).all()  # majority follows the two wrong atlases
    res = fuse("weighted", t(target), t(images), t(labels), [0, 1, 2], similarity=similarity, sigma=1.5)
    check_result(res, [0, 1, 2], truth.shape, 3, weights_expected=True)
    seg = res.segmentation.numpy()
    assert (seg[region] == 1).mean() > 0.95
    assert (seg == truth).mean() > 0.97
    w = res.atlas_weights.numpy()
    assert w[0][region].mean() > 0.8


# ------------------------------------------------------------------------------------------------
# joint label fusion
# ------------------------------------------------------------------------------------------------
def _duplicate_case(rng, shape=(16, 16, 16)):
    """One correct atlas whose image matches the target well, and two identical copies of an
    atlas with a worse image and wrong labels (a cube labelled 42 where the truth is 7)."""
    img = smooth_field(shape, rng)
    truth = np.zeros(shape, np.int64)
    truth[4:12, 4:12, 4:12] = 7
    wrong = truth.copy()
    wrong[5:11, 5:11, 5:11] = 42
    good = np.clip(img + 0.02 * rng.standard_normal(shape), 0, 1)
    bad = np.clip(img + 0.25 * rng.standard_normal(shape), 0, 1)
    images = np.stack([good, bad, bad])[:, None].astype(np.float32)
    labels = np.stack([truth, wrong, wrong])
    region = np.zeros(shape, bool)
    region[6:10, 6:10, 6:10] = True
    return img[None].astype(np.float32), images, labels, truth, region


@pytest.mark.parametrize("metric", ["pearson", "msq"])
def test_jlf_downweights_duplicated_wrong_atlas(metric):
    rng = np.random.default_rng(2)
    target, images, labels, truth, region = _duplicate_case(rng)
    lab = [0, 7, 42]
    mv = fuse("majority", t(target), t(images), t(labels), lab).segmentation.numpy()
    assert (mv[region] == 42).all()
    res = fuse("jlf", t(target), t(images), t(labels), lab, metric=metric)
    check_result(res, lab, truth.shape, 3, weights_expected=True)
    seg = res.segmentation.numpy()
    assert (seg[region] == 7).all()
    w = res.atlas_weights.numpy()
    # the duplicated pair shares (rather than doubles) its weight; the good atlas dominates
    assert w[0][region].mean() > 0.6
    np.testing.assert_allclose(w[1][region], w[2][region], atol=1e-6)


def test_jlf_nonnegative_option_and_beta():
    rng = np.random.default_rng(2)
    target, images, labels, truth, region = _duplicate_case(rng)
    for params in (dict(nonnegative=True), dict(beta=1.5, alpha=0.05)):
        res = fuse("jlf", t(target), t(images), t(labels), [0, 7, 42], search_radius=1, **params)
        check_result(res, [0, 7, 42], truth.shape, 3, weights_expected=True)
        assert (res.segmentation.numpy()[region] == 7).all()


def test_nnls_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 6, 6))
    y = rng.standard_normal((40, 6))
    x = nnls_batched(torch.from_numpy(a), torch.from_numpy(y)).numpy()
    for k in range(40):
        ref, _ = scipy_optimize.nnls(a[k], y[k])
        np.testing.assert_allclose(x[k], ref, atol=1e-6)
    assert (x >= 0).all()


def test_jlf_skip_consensus_gives_identical_result():
    rng = np.random.default_rng(4)
    shape = (20, 18, 22)
    img = smooth_field(shape, rng)
    n = 4
    images = np.stack([np.clip(img + 0.4 * smooth_field(shape, rng), 0, 1.4) for _ in range(n)])[:, None]
    labels = np.zeros((n,) + shape, np.int64)
    for i in range(n):
        labels[i, 6 + i % 2 : 14, 5 : 12 + i % 3, 7:15] = 3
        labels[i, 9:12, 7:10, 9 + i % 2 : 12] = 5
    args = (t(img[None].astype(np.float32)), t(images.astype(np.float32)), t(labels), [0, 3, 5])
    fast = fuse("jlf", *args, search_radius=2, skip_consensus=True)
    full = fuse("jlf", *args, search_radius=2, skip_consensus=False)
    torch.testing.assert_close(fast.posteriors, full.posteriors, atol=2e-6, rtol=0)
    assert torch.equal(fast.segmentation, full.segmentation)
    # far from any label boundary the weights were not solved (1/N) with skipping, solved without
    assert torch.allclose(fast.atlas_weights[:, 0, 0, 0], torch.full((n,), 1.0 / n))
    assert float((full.atlas_weights[:, 10, 9, 11] - 1.0 / n).abs().max()) > 1e-3


# A literal, loop-based re-statement of antsJointFusion (as bundled with antspyx 0.6, checked
# against it voxel by voxel): patches exclude voxels outside the image; z-scoring with the sample
# std (std < 1e-6 -> 1); search offsets in order of distance, first strict best kept; M from
# |z(a) - z(t)|, NaN entries -> 0; negative weights set to 0; votes spread over the patch.
def _cube(rad, sort=False):
    offs = np.array(list(itertools.product(range(-rad, rad + 1), repeat=3)))
    if sort:
        offs = offs[np.argsort((offs**2).sum(1), kind="stable")]
    return offs


def _ants_reference(T, A, L, nl, pr, sr, metric, alpha=0.1, beta=2.0, mask=None):
    T = T.astype(np.float64)
    A = A.astype(np.float64)
    N = A.shape[0]
    D = np.array(T.shape[1:])
    pad = pr + sr
    Tp = np.pad(T, [(0, 0)] + [(pad, pad)] * 3, constant_values=np.nan)
    Ap = np.pad(A, [(0, 0), (0, 0)] + [(pad, pad)] * 3, constant_values=np.nan)
    poffs, soffs = _cube(pr), _cube(sr, sort=True)
    P = len(poffs)
    post = np.zeros((nl,) + tuple(D))
    wsum = np.zeros(tuple(D))

    def patch(img, c):
        idx = c + poffs + pad
        return img[:, idx[:, 0], idx[:, 1], idx[:, 2]]

    def zscore(v):
        out = np.empty_like(v)
        for ch in range(v.shape[0]):
            f = np.isfinite(v[ch])
            m = v[ch][f].mean()
            sd = np.sqrt(((v[ch][f] - m) ** 2).sum() / (f.sum() - 1))
            out[ch] = (v[ch] - m) / (1.0 if sd < 1e-6 else sd)
        return out

    for c in itertools.product(*[range(d) for d in D]):
        c = np.array(c)
        if mask is not None and not mask[tuple(c)]:
            continue
        tn = zscore(patch(Tp, c)).ravel()
        y = patch(Tp, c).ravel() if metric == "msq" else tn
        absd = np.zeros((N, tn.size))
        best = np.zeros(N, int)
        for i in range(N):
            best_sim = np.inf
            for j, o in enumerate(soffs):
                if np.any(c + o < 0) or np.any(c + o >= D):
                    continue
                x = patch(Ap[i], c + o).ravel()
                ok = np.isfinite(x) & np.isfinite(y)
                xx, yy, k = x[ok], y[ok], ok.sum()
                if k < 3:
                    continue
                if metric == "msq":
                    sim = ((yy - xx) ** 2).sum() / k
                else:
                    var = max((xx**2).sum() - xx.sum() ** 2 / k, 1e-6)
                    sxy = (xx * yy).sum()
                    sim = -(sxy**2) / var if sxy > 0 else sxy**2 / var
                if sim < best_sim:
                    best_sim, best[i] = sim, j
            absd[i] = np.abs(zscore(patch(Ap[i], c + soffs[best[i]])).ravel() - tn)
        with np.errstate(invalid="ignore"):
            M = (absd @ absd.T / (P - 1)) ** beta
        M[~np.isfinite(M)] = 0
        w = np.maximum(np.linalg.solve(M + alpha * np.eye(N), np.ones(N)), 0)
        w /= w.sum()
        for p in poffs:
            u = c + p
            if np.any(u < 0) or np.any(u >= D):
                continue
            for i in range(N):
                q = u + soffs[best[i]]
                if np.all(q >= 0) and np.all(q < D):
                    post[L[i][tuple(q)]][tuple(u)] += w[i]
                    wsum[tuple(u)] += w[i]
    return post / np.where(wsum > 0, wsum, 1)


@pytest.mark.parametrize(
    "metric, channels, use_mask, seed",
    [("pearson", 1, False, 5), ("msq", 1, True, 6), ("pearson", 2, True, 7)],
)
def test_jlf_matches_literal_ants_reference(metric, channels, use_mask, seed):
    rng = np.random.default_rng(seed)
    shape = (6, 7, 8)
    T = np.stack([smooth_field(shape, rng, passes=1) for _ in range(channels)])
    A = np.stack(
        [np.clip(T + 0.3 * np.stack([smooth_field(shape, rng, 1) for _ in range(channels)]), 0, 1.3) for _ in range(3)]
    )
    L = np.stack([np.digitize(smooth_field(shape, rng, 2), [0.45, 0.6]) for _ in range(3)])
    mask = None
    if use_mask:
        mask = np.zeros(shape, bool)
        mask[1:, :5, 2:] = True
    ref = _ants_reference(T, A, L, 3, pr=1, sr=1, metric=metric, mask=mask)
    res = fuse(
        "jlf",
        t(T.astype(np.float32)),
        t(A.astype(np.float32)),
        t(L),
        [0, 1, 2],
        mask=None if mask is None else t(mask),
        patch_radius=1,
        search_radius=1,
        metric=metric,
    )
    inside = np.ones(shape, bool) if mask is None else mask
    np.testing.assert_allclose(res.posteriors.numpy()[:, inside], ref[:, inside], atol=2e-5)
    np.testing.assert_array_equal(res.segmentation.numpy()[inside], ref.argmax(0)[inside])


# ------------------------------------------------------------------------------------------------
# mask, label values, all methods
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_mask_and_non_contiguous_labels_all_methods(method):
    rng = np.random.default_rng(8)
    shape = (8, 9, 10)
    target, images, labels, truth = _wrong_majority_case(rng, shape)
    values = np.array([0, 7, 42])
    labels = values[labels]
    mask = np.zeros(shape, bool)
    mask[2:7, 1:8, 3:9] = True
    args = (t(target), t(images), t(labels), [0, 7, 42])
    extra = dict(search_radius=1) if method == "jlf" else {}
    res = fuse(method, *args, mask=t(mask), **extra)
    check_result(res, [0, 7, 42], shape, 3, weights_expected=method in ("weighted", "jlf"))
    seg, post = res.segmentation.numpy(), res.posteriors.numpy()
    assert (seg[~mask] == 0).all()
    assert (post[0][~mask] == 1).all() and (post[1:][:, ~mask] == 0).all()
    assert set(np.unique(seg[mask])) <= {0, 7, 42} and (seg[mask] != 0).any()
    if method in ("majority", "weighted"):  # voxel-wise methods: the mask does not change the inside
        unmasked = fuse(method, *args).segmentation.numpy()
        np.testing.assert_array_equal(seg[mask], unmasked[mask])


def test_staple_known_case():
    rng = np.random.default_rng(9)
    shape = (10, 11, 12)
    truth = np.zeros(shape, np.int64)
    truth[2:8, 3:9, 2:10] = 5
    truth[4:6, 4:7, 4:8] = 9
    raters = [truth] * 3
    for _ in range(2):  # two raters with 15 % random errors
        noisy = truth.copy()
        flip = rng.random(shape) < 0.15
        noisy[flip] = rng.choice([0, 5, 9], size=int(flip.sum()))
        raters.append(noisy)
    res = fuse("staple", None, None, t(np.stack(raters)), [0, 5, 9])
    check_result(res, [0, 5, 9], shape, 5, weights_expected=False)
    np.testing.assert_array_equal(res.segmentation.numpy(), truth)
    # the posteriors are recomputed from the filter's confusion matrices: their arg-max is the label
    np.testing.assert_array_equal(np.array([0, 5, 9])[res.posteriors.numpy().argmax(0)], truth)
    assert float(res.posteriors.max(0).values.min()) > 0.5


def test_staple_undecided_voxels_get_majority_vote():
    # two raters disagreeing (1 vs 2) on the only voxel where either says 2: SimpleITK's filter
    # leaves it undecided; the majority-vote fallback takes the lowest tied label, 1
    a = np.zeros((2, 1, 2, 2), np.int64)
    a[0, 0, 0, 0] = 1
    a[1, 0, 0, 0] = 2
    a[:, 0, 1, :] = 1
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(3)
    direct = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(x.astype(np.uint16)) for x in a]))
    assert direct[0, 0, 0] == 3  # undecided in SimpleITK
    res = fuse("staple", None, None, t(a), [0, 1, 2])
    check_result(res, [0, 1, 2], (1, 2, 2), 2, weights_expected=False)
    assert res.segmentation[0].tolist() == [[1, 0], [1, 1]]
    assert int(res.posteriors[:, 0, 0, 0].argmax()) == 1


# ------------------------------------------------------------------------------------------------
# oracle and agreement
# ------------------------------------------------------------------------------------------------
def test_oracle_coverage_and_agreement_exact_fractions():
    # 5 atlases, 4 voxels; reference labels 0, 3, 3, 8
    atl = np.array(
        [
            [0, 3, 0, 8],
            [0, 0, 0, 0],
            [3, 3, 0, 0],
            [0, 3, 0, 0],
            [0, 0, 0, 0],
        ]
    ).reshape(5, 1, 1, 4)
    ref = np.array([0, 3, 3, 8]).reshape(1, 1, 4)
    covered, summary = oracle_coverage(t(atl), t(ref), [0, 3, 8], fraction=0.2)
    # atlases carrying the reference label: 4/5, 3/5, 0/5, 1/5 -> covered, covered, no, yes (>= 0.2)
    assert covered[0, 0].tolist() == [True, True, False, True]
    assert summary[0] == 1.0 and summary[3] == 0.5 and summary[8] == 1.0
    assert summary["foreground"] == pytest.approx(2 / 3)
    covered, summary = oracle_coverage(t(atl), t(ref), [0, 3, 8], fraction=0.5)
    assert covered[0, 0].tolist() == [True, True, False, False]
    assert summary["foreground"] == pytest.approx(1 / 3)
    agree = atlas_agreement(t(atl))
    # majority sizes: 4 (0), 3 (3), 5 (0), 4 (0)
    np.testing.assert_allclose(agree[0, 0].numpy(), [0.8, 0.6, 1.0, 0.8])


# ------------------------------------------------------------------------------------------------
# errors and progress
# ------------------------------------------------------------------------------------------------
def _ok_inputs():
    rng = np.random.default_rng(10)
    target = t(rng.random((1, 4, 5, 6), dtype=np.float32))
    images = t(rng.random((2, 1, 4, 5, 6), dtype=np.float32))
    labels = t(rng.integers(0, 2, size=(2, 4, 5, 6)))
    return target, images, labels


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(method="vote"), "unknown fusion method"),
        (dict(params=dict(sigmaa=1.0), method="weighted"), "unknown parameter"),
        (dict(params=dict(alpha=-1.0)), "alpha"),
        (dict(params=dict(metric="ncc")), "metric"),
        (dict(params=dict(patch_radius=0)), "patch_radius"),
        (dict(params=dict(similarity="mi"), method="weighted"), "similarity"),
        (dict(params=dict(decision="vote")), "decision"),
        (dict(labels=[1, 2]), "background 0"),
        (dict(labels=[0, 2, 1]), "sorted"),
        (dict(labels=[0]), "not in labels"),
        (dict(atlas_labels=torch.zeros((0, 4, 5, 6), dtype=torch.int64)), "N >= 1"),
        (dict(atlas_labels=torch.zeros((2, 4, 5, 7), dtype=torch.int64)), "spatial shape"),
        (dict(atlas_labels=torch.zeros((2, 4, 5, 6))), "integer"),
        (dict(atlas_images=torch.zeros((3, 1, 4, 5, 6))), "atlas images but 2"),
        (dict(target=torch.zeros((2, 4, 5, 6))), "modalities"),
        (dict(target=None), "needs the target"),
        (dict(mask=torch.ones((4, 5, 6), dtype=torch.int64)), "bool"),
        (dict(mask=torch.ones((4, 5), dtype=torch.bool)), "shape"),
    ],
)
def test_clear_errors(change, match):
    target, images, labels = _ok_inputs()
    kw = dict(method="jlf", target=target, atlas_images=images, atlas_labels=labels, labels=[0, 1], mask=None)
    params = change.pop("params", {})
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        fuse(
            kw.pop("method"),
            kw.pop("target"),
            kw.pop("atlas_images"),
            kw.pop("atlas_labels"),
            kw.pop("labels"),
            mask=kw.pop("mask"),
            **params,
        )


def test_oracle_errors():
    with pytest.raises(ValueError, match="fraction"):
        oracle_coverage(torch.zeros((2, 3, 3, 3), dtype=torch.int64), torch.zeros((3, 3, 3)), [0], fraction=0)
    with pytest.raises(ValueError, match="shape"):
        oracle_coverage(torch.zeros((2, 3, 3, 3), dtype=torch.int64), torch.zeros((3, 3)), [0])
    with pytest.raises(ValueError, match="integer"):
        atlas_agreement(torch.zeros((2, 3, 3, 3)))


def test_progress_reports_fractions_up_to_one():
    target, images, labels = _ok_inputs()
    for method in METHODS:
        seen = []

        def record(f, m, seen=seen):
            seen.append((f, m))

        fuse(
            method,
            target,
            images,
            labels,
            [0, 1],
            progress=record,
            **(dict(search_radius=1) if method == "jlf" else {}),
        )
        fr = [f for f, _ in seen]
        assert fr and fr[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fr)
        assert fr == sorted(fr) and all(isinstance(m, str) and m for _, m in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    target, images, labels, truth, region = _duplicate_case(rng, shape=(12, 12, 12))
    for method in METHODS:
        cpu = fuse(method, t(target), t(images), t(labels), [0, 7, 42])
        gpu = fuse(method, t(target).cuda(), t(images).cuda(), t(labels).cuda(), [0, 7, 42])
        assert gpu.segmentation.is_cuda and gpu.posteriors.is_cuda
        torch.testing.assert_close(gpu.posteriors.cpu(), cpu.posteriors, atol=1e-4, rtol=0)
