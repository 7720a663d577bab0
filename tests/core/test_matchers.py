"""Matching beyond co-activation: the stitch between residual spaces, weight-space and
transport matching, fan-out, agreement between matchers and the statistics of pairs.

Planted cases use small sizes; every statistic is also checked against a direct
computation on small arrays.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment
from scipy.stats import ortho_group

from saeuniv.core.matching import (
    Matches,
    agreement,
    cofiring,
    correlation,
    cross_reconstruction,
    decoder_cosine,
    fan_out,
    jaccard,
    latent_scaling,
    match,
    stitch,
    top_splits,
    vocab_cosine,
)
from saeuniv.core.matching.transport import plan, share


def planted_spaces(seed, n=2000, d_a=24, d_b=40, noise=0.05):
    """A's residual rows and B's, related by a random semi-orthogonal map and a scale."""
    rng = np.random.default_rng(seed)
    q = ortho_group.rvs(d_b, random_state=seed)[:d_a]  # (d_a, d_b), orthonormal rows
    x_a = rng.normal(size=(n, d_a)) * rng.uniform(0.5, 2.0, d_a) + 3.0
    x_b = 2.5 * x_a @ q + 1.0 + noise * rng.normal(size=(n, d_b))
    return x_a, x_b, 2.5 * q


# ------------------------------------------------------- stitch


@pytest.mark.parametrize("kind", ["orthogonal", "affine"])
def test_stitch_recovers_a_planted_map_with_held_out_r2(kind):
    x_a, x_b, w = planted_spaces(0)
    s = stitch(x_a, x_b, kind=kind, holdout=0.25, seed=3)
    assert (s.n_fit, s.n_heldout) == (1500, 500)
    assert s.r2_heldout > 0.99 and s.r2_fit > 0.99
    np.testing.assert_allclose(s.weight, w, atol=0.02)
    np.testing.assert_allclose(s(x_a[:5]), x_b[:5], atol=0.3)


def test_orthogonal_stitch_is_procrustes_on_the_zero_padded_square_problem():
    rng = np.random.default_rng(1)
    for d_a, d_b in ((5, 9), (9, 5), (7, 7)):
        x_a, x_b = rng.normal(size=(60, d_a)), rng.normal(size=(60, d_b))
        s = stitch(x_a, x_b, holdout=0.0)
        d = max(d_a, d_b)
        pa = np.pad(x_a - x_a.mean(0), ((0, 0), (0, d - d_a)))
        pb = np.pad(x_b - x_b.mean(0), ((0, 0), (0, d - d_b)))
        r, sv = orthogonal_procrustes(pa, pb)
        scale = sv / np.sum(pa**2)  # scipy returns the sum of singular values
        np.testing.assert_allclose(s.weight, scale * r[:d_a, :d_b], atol=1e-10)
        assert np.isnan(s.r2_heldout)


def test_affine_stitch_is_ridge_least_squares():
    rng = np.random.default_rng(2)
    x_a, x_b = rng.normal(size=(80, 6)), rng.normal(size=(80, 4))
    s = stitch(x_a, x_b, kind="affine", ridge=0.5, holdout=0.0)
    xa, xb = x_a - x_a.mean(0), x_b - x_b.mean(0)
    lam = 0.5 * np.trace(xa.T @ xa) / 6
    want = np.linalg.inv(xa.T @ xa + lam * np.eye(6)) @ xa.T @ xb
    np.testing.assert_allclose(s.weight, want, atol=1e-10)
    pred = s(x_a)
    r2 = 1 - ((x_b - pred) ** 2).sum() / ((x_b - x_b.mean(0)) ** 2).sum()
    assert s.r2_fit == pytest.approx(r2)
    free = stitch(x_a, x_b, kind="affine", ridge=0.0, holdout=0.0)
    np.testing.assert_allclose(free.weight, np.linalg.lstsq(xa, xb, rcond=None)[0])


def test_stitch_refuses_bad_input_with_the_fix():
    x = np.ones((10, 3))
    with pytest.raises(ValueError, match="unknown stitch kind 'rigid'"):
        stitch(x, x, kind="rigid")
    with pytest.raises(ValueError, match="x_a has 10 rows but x_b has 9"):
        stitch(x, x[:9])
    with pytest.raises(ValueError, match="holdout must be a fraction"):
        stitch(x, x, holdout=1.0)
    with pytest.raises(ValueError, match="ridge must be"):
        stitch(x, x, ridge=-1)
    with pytest.raises(ValueError, match="NaN or inf"):
        stitch(np.full((10, 3), np.nan), x)
    with pytest.raises(ValueError, match="leave 1 to fit"):
        stitch(x[:2], x[:2], holdout=0.5)
    with pytest.raises(ValueError, match="width 4; the stitch maps width 3"):
        stitch(x, x, holdout=0.0)(np.ones((2, 4)))


# ------------------------------------------------------- weight space


def test_decoder_cosine_equals_a_direct_loop():
    rng = np.random.default_rng(3)
    w_a, w_b = rng.normal(size=(5, 4)), rng.normal(size=(6, 7))
    w_a[2] = 0.0
    s = stitch(rng.normal(size=(50, 4)), rng.normal(size=(50, 7)), holdout=0.0)
    got = decoder_cosine(w_a, w_b, s, dtype=np.float64)
    for i in range(5):
        for j in range(6):
            u, v = w_a[i] @ s.weight, w_b[j]
            want = u @ v / np.linalg.norm(u) / np.linalg.norm(v) if i != 2 else np.nan
            np.testing.assert_allclose(got[i, j], want, atol=1e-12)
    padded = decoder_cosine(w_a, w_b, dtype=np.float64)  # no stitch: zero-padded
    u = np.pad(w_a[0], (0, 3))
    assert padded[0, 1] == pytest.approx(u @ w_b[1] / np.linalg.norm(u) / np.linalg.norm(w_b[1]))
    with pytest.raises(ValueError, match="the stitch maps width 4 to 7"):
        decoder_cosine(w_b, w_a, s)


def test_decoder_cosine_after_the_stitch_recovers_planted_pairs_and_not_without():
    seed, f = 5, 60
    rng = np.random.default_rng(seed)
    x_a, x_b, _ = planted_spaces(seed, d_a=24, d_b=40, noise=0.3)
    s = stitch(x_a, x_b, holdout=0.2, seed=seed)
    w_a = rng.normal(size=(f, 24))
    perm = rng.permutation(f)
    w_b = np.empty((f, 40))
    w_b[perm] = w_a @ s.weight / 2.5 + 0.05 * rng.normal(size=(f, 40))  # B's copy of each
    for policy in ("one_to_one", "hungarian"):
        m = match(decoder_cosine(w_a, w_b, s), policy, threshold=0.0)
        assert np.mean(perm[m.a] == m.b) >= 0.95 and m.n >= 0.95 * f
        raw = match(decoder_cosine(w_a, w_b), policy, threshold=-1.0)
        assert np.sum(perm[raw.a] == raw.b) <= 5  # chance: about 1 of 60


def test_vocab_cosine_equals_centred_logit_cosines():
    rng = np.random.default_rng(4)
    w_a, w_b = rng.normal(size=(7, 5)), rng.normal(size=(4, 3))
    u_a, u_b = rng.normal(size=(5, 30)), rng.normal(size=(3, 30))
    got = vocab_cosine(w_a, u_a, w_b, u_b, dtype=np.float64)
    la, lb = w_a @ u_a, w_b @ u_b
    la, lb = la - la.mean(1, keepdims=True), lb - lb.mean(1, keepdims=True)
    want = (la / np.linalg.norm(la, axis=1, keepdims=True)) @ (
        lb / np.linalg.norm(lb, axis=1, keepdims=True)).T
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="cover 30 and 29 tokens.*shared tokenizer"):
        vocab_cosine(w_a, u_a, w_b, u_b[:, :29])
    with pytest.raises(ValueError, match="w_dec_b has width 3 but w_u_b has 5 rows"):
        vocab_cosine(w_a, u_a, w_b, u_a)


# ------------------------------------------------------- transport


@pytest.mark.parametrize("seed", range(8))
def test_sinkhorn_with_vanishing_entropy_is_the_hungarian_assignment(seed):
    sim = np.random.default_rng(seed).uniform(-1, 1, (9, 9))
    want = match(sim, "hungarian", threshold=-1.0)
    got = match(sim, "sinkhorn", threshold=-1.0, reg=1e-3)
    assert list(zip(got.a, got.b)) == list(zip(want.a, want.b))
    p = plan(sim, reg=1e-3)
    i, j = linear_sum_assignment(sim, maximize=True)
    assert (share(p, 9, 9)[i, j] > 0.9).all()  # nearly all of each feature's mass
    assert p.sum() == pytest.approx(1.0)


def test_sinkhorn_recovers_a_planted_matching_with_a_long_tail():
    rng = np.random.default_rng(6)
    f = 200
    strength = np.geomspace(0.9, 0.08, f)  # most pairs are weak: the tail
    sim = rng.normal(0, 0.02, (f, f))
    perm = rng.permutation(f)
    sim[np.arange(f), perm] = strength
    m = match(sim, "sinkhorn", threshold=-1.0)
    assert np.mean(perm[m.a] == m.b) >= 0.95 and m.n >= 0.95 * f


def test_unbalanced_sinkhorn_leaves_the_mass_of_unmatched_features_out():
    rng = np.random.default_rng(7)
    f, decoys = 40, 10
    sim = rng.normal(0, 0.02, (f + decoys, f))
    sim[np.arange(f), np.arange(f)] = 0.8
    for reg_m in (None, 0.5):
        m = match(sim, "sinkhorn", threshold=-1.0, reg_m=reg_m)
        assert set(zip(m.a, m.b)) == {(i, i) for i in range(f)}
    sent = plan(sim, reg_m=None).sum(1) * (f + decoys)
    np.testing.assert_allclose(sent, 1.0, atol=1e-6)  # balanced: every feature sends all
    sent = plan(sim, reg_m=0.5).sum(1) * (f + decoys)
    assert sent[:f].min() > 0.75 and sent[f:].max() < 0.3  # decoys keep most of theirs


def test_sinkhorn_lets_one_feature_split_across_a_wider_side():
    sim = np.full((2, 4), 0.0)
    sim[0, :2] = sim[1, 2:] = 0.9  # A's 0 has two children, A's 1 the other two
    m = match(sim, "sinkhorn", threshold=0.5)
    assert sorted(zip(m.a.tolist(), m.b.tolist())) == [(0, 0), (0, 1), (1, 2), (1, 3)]


def test_sinkhorn_skips_dead_features_and_checks_its_options():
    sim = np.random.default_rng(8).uniform(0, 1, (5, 5))
    sim[1] = np.nan
    sim[:, 2] = np.nan
    m = match(sim, "sinkhorn", threshold=-1.0, reg=1e-3)
    want = match(sim, "hungarian", threshold=-1.0)
    assert list(zip(m.a, m.b)) == list(zip(want.a, want.b)) and m.n == 4
    assert match(np.full((3, 3), np.nan), "sinkhorn").n == 0
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        match(sim, "sinkhorn", reg=0)
    with pytest.raises(ValueError, match="mass must be a share"):
        match(sim, "sinkhorn", mass=1.0)
    with pytest.raises(ValueError, match=r"options \['pool_size'\] do not apply"):
        match(sim, "sinkhorn", pool_size=2)


# ------------------------------------------------------- fan-out


def planted_splits(seed, n=6000, f_a=60, n_split=20, density=0.04):
    """A features, each with one B twin, except the first n_split, which split: two B
    children, each firing on a disjoint half of the parent's tokens."""
    rng = np.random.default_rng(seed)
    fire = rng.random((n, f_a)) < density
    codes_a = fire * rng.exponential(1.0, (n, f_a))
    cols, half = [], rng.random(n) < 0.5
    for i in range(f_a):
        if i < n_split:
            cols += [codes_a[:, i] * half, codes_a[:, i] * ~half]
        else:
            cols.append(codes_a[:, i] * (rng.random(n) < 0.9))
    noise = (rng.random((n, 30)) < density) * rng.exponential(1.0, (n, 30))
    codes_b = np.column_stack(cols + [noise])
    perm = rng.permutation(codes_b.shape[1])
    return sp.csr_matrix(codes_a), sp.csr_matrix(codes_b[:, perm]), np.argsort(perm)


def test_fan_out_finds_planted_splits_with_few_false_ones():
    codes_a, codes_b, where = planted_splits(9)
    corr = correlation(codes_a, codes_b)
    fo = fan_out(corr, 0.3)
    assert np.mean(fo.a[:20] == 2) >= 0.9
    assert np.mean(fo.a[20:] >= 2) <= 0.05
    assert fo.split_share_a == pytest.approx(np.mean(fo.a[fo.a >= 1] >= 2))
    splits = top_splits(corr, 0.3, n=20)
    assert {s["a"] for s in splits} <= set(range(20)) and len(splits) >= 18
    first = splits[0]
    assert sorted(first["children"]) == sorted(where[[2 * first["a"], 2 * first["a"] + 1]])
    assert first["corr"] == sorted(first["corr"], reverse=True)


def test_fan_out_counts_equal_a_direct_loop():
    corr = np.random.default_rng(10).uniform(-1, 1, (7, 5))
    corr[3, 1] = np.nan
    fo = fan_out(corr, 0.2)
    for i in range(7):
        assert fo.a[i] == sum(corr[i, j] > 0.2 for j in range(5))
    for j in range(5):
        assert fo.b[j] == sum(corr[i, j] > 0.2 for i in range(7))
    hist = fo.histogram("a", top=3)
    assert sum(hist.values()) == 7 and hist["3+"] == int((fo.a >= 3).sum())
    with pytest.raises(ValueError, match="threshold must be in"):
        fan_out(corr, 2.0)


# ------------------------------------------------------- agreement


def test_jaccard_and_agreement_by_hand():
    m1 = Matches([0, 1, 2], [0, 1, 2], [0.5] * 3)
    m2 = Matches([0, 1, 3], [0, 2, 3], [0.5] * 3)
    assert jaccard(m1, m2) == pytest.approx(1 / 5)
    assert jaccard(m1, m1) == 1.0
    assert np.isnan(jaccard(Matches([], [], []), Matches([], [], [])))
    got = agreement({"corr": m1, "cos": m2, "ot": m1})
    assert got == {"corr_vs_cos": pytest.approx(0.2), "corr_vs_ot": 1.0,
                   "cos_vs_ot": pytest.approx(0.2)}
    with pytest.raises(ValueError, match=r"matches\['x'\] must be a Matches"):
        agreement({"x": [1]})


# ------------------------------------------------------- statistics of pairs


def test_cofiring_and_latent_scaling_equal_direct_computations():
    rng = np.random.default_rng(11)
    a = (rng.random((200, 6)) < 0.3) * rng.exponential(1.0, (200, 6))
    b = (rng.random((200, 4)) < 0.3) * rng.exponential(1.0, (200, 4))
    a[:, 5] = 0.0  # never fires
    m = Matches([0, 2, 5, 4], [1, 1, 3, 0], [0.1] * 4)
    co = cofiring(sp.csr_matrix(a), sp.csr_matrix(b), m)
    ls = latent_scaling(sp.csr_matrix(a), sp.csr_matrix(b), m)
    for k, (i, j) in enumerate(zip(m.a, m.b)):
        fa, fb = a[:, i] > 0, b[:, j] > 0
        if i == 5:
            assert np.isnan(co["cofire"][k]) and np.isnan(ls["beta"][k])
            continue
        assert co["cofire"][k] == pytest.approx((fa & fb).sum() / fa.sum())
        assert co["iou"][k] == pytest.approx((fa & fb).sum() / (fa | fb).sum())
        beta = np.linalg.lstsq(a[:, [i]], b[:, j], rcond=None)[0][0]
        assert ls["beta"][k] == pytest.approx(beta)
        resid = b[:, j] - beta * a[:, i]
        assert ls["explained"][k] == pytest.approx(1 - resid @ resid / (b[:, j] @ b[:, j]))
    with pytest.raises(ValueError, match="outside"):
        cofiring(sp.csr_matrix(a), sp.csr_matrix(b), Matches([0], [9], [0.1]))


def test_cross_reconstruction_is_explained_variance_and_alignment_helps():
    x_a, x_b, _ = planted_spaces(12, n=1500, noise=0.1)
    s = stitch(x_a[:1000], x_b[:1000])
    basis = np.linalg.qr(np.random.default_rng(12).normal(size=(40, 30)))[0]
    mean_b = x_b.mean(0)

    def reconstruct(x):  # a linear stand-in for B's SAE: projection onto 30 directions
        return (x - mean_b) @ basis @ basis.T + mean_b

    got = cross_reconstruction(x_a[1000:], x_b[1000:], reconstruct, s)
    xb = x_b[1000:]
    total = ((xb - xb.mean(0)) ** 2).sum()
    want_aligned = 1 - ((xb - reconstruct(s(x_a[1000:]))) ** 2).sum() / total
    assert got.aligned == pytest.approx(want_aligned)
    assert got.own == pytest.approx(1 - ((xb - reconstruct(xb)) ** 2).sum() / total)
    assert got.aligned > 0.5 and got.raw < 0.1 and got.own >= got.aligned - 0.05
    assert got.stitch > 0.99
    with pytest.raises(ValueError, match="the stitch maps width 24 to 40"):
        cross_reconstruction(x_b, x_a, reconstruct, s)
