"""The matching core: correlation, top-k, policies, the matching rule and its token
filters."""

import inspect
import itertools
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from saeuniv.core.matching import (
    JUNK_TEXTS,
    POLICIES,
    CorrelationAccumulator,
    Matches,
    Pairing,
    Rule,
    TopActivations,
    TopTokens,
    correlation,
    junk_filter,
    junk_ids,
    match,
    pair,
    shared_token_filter,
    shares_text,
    top_activations,
    top_tokens,
    topk_correlation,
)


def sparse_codes(rng, n_tokens, n_features, density=0.3):
    """Nonnegative SAE-like dense codes."""
    mask = rng.random((n_tokens, n_features)) < density
    return rng.exponential(1.0, (n_tokens, n_features)) * mask


def corrcoef(x, y):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1]:]


def chunks(x, bounds):
    return [sp.csr_array(x[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x, y = sparse_codes(rng, 300, 12), sparse_codes(rng, 300, 9)
    x[:, 4] = 0.0  # dead: never fires
    y[:, 7] = 2.5  # dead: constant
    return x, y


# ------------------------------------------------------- correlation


def test_correlation_matches_corrcoef_with_dead_features(data):
    x, y = data
    corr = correlation(sp.csr_array(x), sp.csr_array(y), dtype=np.float64)
    ref = corrcoef(x, y)
    assert corr.shape == (12, 9) and corr.dtype == np.float64
    assert np.isnan(corr[4]).all() and np.isnan(corr[:, 7]).all()
    assert np.isnan(corr).sum() == 9 + 12 - 1
    np.testing.assert_allclose(corr, ref, atol=1e-10, rtol=0)


def test_correlation_streamed_in_uneven_chunks_equals_one_shot(data):
    x, y = data
    bounds = [0, 1, 50, 50, 173, 300]  # includes a 1-row and an empty chunk
    streamed = correlation(chunks(x, bounds), chunks(y, bounds), dtype=np.float64)
    one_shot = correlation(sp.csr_matrix(x), sp.csr_matrix(y), dtype=np.float64)
    np.testing.assert_allclose(streamed, corrcoef(x, y), atol=1e-10, rtol=0)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-12, rtol=0)


def test_accumulator_small_blocks_and_nondestructive_result(data):
    x, y = data
    acc = CorrelationAccumulator(block_bytes=8 * 9 * 5)  # 5-row blocks: 12 = 5 + 5 + 2
    acc.update(sp.csr_array(x[:100]), sp.csr_array(y[:100]))
    np.testing.assert_allclose(acc.result(np.float64), corrcoef(x[:100], y[:100]),
                               atol=1e-10)
    acc.update(sp.csr_array(x[100:]), sp.csr_array(y[100:]))
    assert acc.n_tokens == 300 and acc.n_chunks == 2
    np.testing.assert_allclose(acc.result(np.float64, release=True), corrcoef(x, y),
                               atol=1e-10)
    with pytest.raises(ValueError, match="release"):
        acc.update(sp.csr_array(x), sp.csr_array(y))


def test_correlation_float32_default_and_other_formats(data):
    x, y = data
    corr = correlation(sp.coo_array(x), sp.csc_matrix(y))
    assert corr.dtype == np.float32
    np.testing.assert_allclose(corr, corrcoef(x, y), atol=1e-6)


def test_duplicate_entries_are_summed():
    rng = np.random.default_rng(1)
    x, y = sparse_codes(rng, 40, 3, 0.5), sparse_codes(rng, 40, 2, 0.5)
    r, c = np.nonzero(x)
    halves = sp.csr_array((np.r_[x[r, c] / 2, x[r, c] / 2], (np.r_[r, r], np.r_[c, c])),
                          shape=x.shape)  # each value stored as two halves
    np.testing.assert_allclose(correlation(halves, sp.csr_array(y), np.float64),
                               corrcoef(x, y), atol=1e-10)


# ------------------------------------------------------- top-k


# 1 element, 7-column blocks, one block
@pytest.mark.parametrize("max_bytes", [8, 8 * 7, 10**6])
def test_topk_agrees_with_argsort_of_full_matrix(data, max_bytes):
    x, y = data
    k = 3
    top = topk_correlation(sp.csr_array(x), sp.csr_array(y), k=k, max_bytes=max_bytes,
                           dtype=np.float64)
    full = np.nan_to_num(corrcoef(x, y), nan=-np.inf)
    for partner, corr, mat, dead in ((top.a_partner, top.a_corr, full, 4),
                                     (top.b_partner, top.b_corr, full.T, 7)):
        expect = np.argsort(-mat, axis=1, kind="stable")[:, :k]
        live = np.arange(len(mat)) != dead
        np.testing.assert_array_equal(partner[live], expect[live])
        np.testing.assert_allclose(corr[live], np.take_along_axis(mat, expect, 1)[live],
                                   atol=1e-10)
        assert (partner[dead] == -1).all() and np.isnan(corr[dead]).all()
    assert 7 not in top.a_partner and 4 not in top.b_partner  # dead never a partner


def test_topk_pads_when_k_exceeds_live_partners(data):
    x, y = data
    top = topk_correlation(sp.csr_array(x), sp.csr_array(y), k=10)
    assert top.a_partner.shape == (12, 10)
    assert (top.a_partner[0, 8:] == -1).all() and np.isnan(top.a_corr[0, 8:]).all()
    assert (top.a_partner[0, :8] >= 0).all()


# ------------------------------------------------------- policies


def test_one_to_one_keeps_best_pair_lan_keeps_first():
    corr = np.array([[0.5, 0.9, 0.0],
                     [0.2, 0.1, 0.3]])
    # every B column's best A is 0 except b=2 (a=1); A 0 is first found with b=0 (0.5)
    lan, best = match(corr, "lan", 0.0), match(corr, "one_to_one", 0.0)
    assert list(zip(lan.a, lan.b)) == [(0, 0), (1, 2)]
    assert list(zip(best.a, best.b)) == [(0, 1), (1, 2)]
    np.testing.assert_allclose(best.corr, [0.9, 0.3])
    assert best.unique_a_fraction == 1.0


def test_ties_go_to_lowest_index():
    corr = np.array([[0.7, 0.7, 0.7]])
    m = match(corr, "one_to_one", 0.0)
    assert list(m.b) == [0] and m.n == 1
    corr = np.array([[0.1, 0.2], [0.6, 0.6], [0.6, 0.6]])  # ties within and across rows
    assert list(match(corr, "max", 0.0).a) == [1, 1]
    m = match(corr, "mutual", 0.0)
    assert list(zip(m.a, m.b)) == [(1, 0)]


def test_max_allows_many_a_to_one_b_and_sorts_by_b():
    corr = np.array([[0.9, 0.8, 0.1],
                     [0.1, 0.2, 0.6]])
    m = match(corr, "max", 0.0)
    assert list(m.a) == [0, 0, 1] and list(m.b) == [0, 1, 2]
    assert m.unique_a_fraction == pytest.approx(2 / 3)


def test_mutual_needs_both_directions():
    corr = np.array([[0.9, 0.8],
                     [0.1, 0.7],
                     [0.0, 0.75]])
    # b0 <-> a0 mutual; b1's best is a0 (0.8) but a0's best is b0
    m = match(corr, "mutual", 0.0)
    assert list(zip(m.a, m.b)) == [(0, 0)]


def test_hungarian_matches_brute_force_optimum():
    corr = np.random.default_rng(3).uniform(-1, 1, (5, 5))
    m = match(corr, "hungarian", threshold=-1.0)
    best = max(itertools.permutations(range(5)), key=lambda p: corr[range(5), p].sum())
    assert corr[m.a, m.b].sum() == pytest.approx(corr[range(5), best].sum())
    assert sorted(m.a) == list(range(5)) and list(m.b) == list(range(5))


def test_hungarian_rectangular_pools_and_dead():
    rng = np.random.default_rng(4)
    corr = rng.uniform(0.2, 1.0, (6, 4))
    corr[2] = np.nan
    full = match(corr, "hungarian", 0.0)
    assert full.n == 4 and 2 not in full.a and full.unique_a_fraction == 1.0
    pooled = match(corr, "hungarian", 0.0, pool_a=[0, 1, 2], pool_b=[1, 3])
    assert set(pooled.a) <= {0, 1} and list(pooled.b) == [1, 3]
    activity_a, activity_b = np.arange(6.0), np.array([5.0, 1.0, 4.0, 0.0])
    top = match(corr, "hungarian", 0.0, pool_size=2, activity_a=activity_a,
                activity_b=activity_b)
    assert set(top.a) <= {4, 5} and list(top.b) == [0, 2]


def test_threshold_is_strict():
    corr = np.array([[0.5, 0.0], [0.0, 0.3]])
    assert match(corr, "max", 0.3).n == 1
    assert match(corr, "max", 0.2999).n == 2


def test_dead_features_never_matched(data):
    x, y = data
    corr = correlation(sp.csr_array(x), sp.csr_array(y))
    for policy in ("max", "one_to_one", "mutual", "hungarian", "lan"):
        m = match(corr, policy, threshold=-1.0)
        assert m.n > 0 and 4 not in m.a and 7 not in m.b
        assert np.isfinite(m.corr).all()


def test_planted_matching_is_recovered_by_dense_and_topk():
    rng = np.random.default_rng(5)
    n_tokens, n_features = 2000, 60
    x = sparse_codes(rng, n_tokens, n_features, 0.05)
    perm = rng.permutation(n_features)
    y = (x[:, perm] * rng.uniform(0.8, 1.2, x.shape)
         + sparse_codes(rng, n_tokens, n_features, 0.01))
    a, b = sp.csr_array(x), sp.csr_array(y)
    for corr in (correlation(a, b), topk_correlation(a, b, max_bytes=8 * 60 * 7)):
        for policy in ("one_to_one", "mutual", "lan"):
            m = match(corr, policy, threshold=0.5)
            np.testing.assert_array_equal(m.b, np.arange(n_features))
            np.testing.assert_array_equal(m.a, perm)
    m = match(correlation(a, b), "hungarian", threshold=0.5)
    np.testing.assert_array_equal(m.a, perm)


# ------------------------------------------------------- activations and filters


def test_top_activations_vs_dense_argsort_streamed():
    rng = np.random.default_rng(6)
    x = sparse_codes(rng, 120, 8, 0.2)
    x[:, 3] = 0.0
    x[[5, 9], 3] = 1.0  # fewer than k non-zeros, tied
    x[[10, 40, 70], 6] = 9.0  # three-way tie across chunks
    k = 4
    streamed = top_activations(chunks(x, [0, 30, 31, 90, 120]), k=k)
    one_shot = top_activations(sp.csr_array(x), k=k)
    expect = np.argsort(-x, axis=0, kind="stable")[:k].T
    full = (x > 0).sum(0) >= k
    for top in (streamed, one_shot):
        np.testing.assert_array_equal(top.rows[full], expect[full])
        np.testing.assert_allclose(top.values[full],
                                   np.take_along_axis(x.T, expect, 1)[full], rtol=1e-6)
        assert top.rows.dtype == np.int64 and top.values.dtype == np.float32
    np.testing.assert_array_equal(streamed.rows[3], [5, 9, -1, -1])
    np.testing.assert_array_equal(streamed.rows[6, :3], [10, 40, 70])
    np.testing.assert_array_equal(streamed.tokens(np.arange(120) + 1000)[3],
                                  [1005, 1009, -1, -1])


def test_junk_filter():
    m = Matches(a=[0, 1, 2], b=[0, 1, 2], corr=[0.9, 0.8, 0.7])
    tok_a = np.array([[5, 6], [7, -1], [1, 9]])
    tok_b = np.array([[5, 1], [7, 7], [8, 0]])
    # junk in B, in A; padding never junk
    kept = junk_filter(m, tok_a, tok_b, junk_ids=[1, -1])
    assert list(kept.a) == [1]
    np.testing.assert_allclose(kept.corr, [0.8])
    assert junk_filter(m, tok_a, tok_b, junk_ids=[]).n == 3


def test_shared_token_filter():
    m = Matches(a=[0, 1, 2], b=[2, 0, 1], corr=[0.9, 0.8, 0.7])
    tok_a = np.array([[1, 2], [3, -1], [4, 5]])
    tok_b = np.array([[-1, 6], [5, 7], [8, 2]])
    kept = shared_token_filter(m, tok_a, tok_b)  # pair (1,0) shares only -1 padding
    assert list(zip(kept.a, kept.b)) == [(0, 2), (2, 1)]


# ------------------------------------------------------- bad inputs


def test_bad_inputs_raise(data):
    x, y = data
    a, b = sp.csr_array(x), sp.csr_array(y)
    with pytest.raises(ValueError, match="300 token rows but codes_b has 299"):
        correlation(a, sp.csr_array(y[:299]))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        correlation(sp.csr_array(bad), b)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="1 inf"):
        topk_correlation(sp.csr_array(bad), b)
    with pytest.raises(ValueError, match="csr_array"):
        correlation(x, b)
    with pytest.raises(ValueError, match="codes_b ran out of chunks after 2"):
        correlation(chunks(x, [0, 100, 200, 300]), chunks(y, [0, 100, 200]))
    with pytest.raises(ValueError, match="chunk 1: codes_a has 100 token rows"):
        correlation(chunks(x, [0, 100, 200]), chunks(y, [0, 100, 250]))
    with pytest.raises(ValueError, match="no tokens"):
        correlation(sp.csr_array((0, 3)), sp.csr_array((0, 2)))
    with pytest.raises(ValueError, match="unknown policy 'best'.*one_to_one"):
        match(np.zeros((2, 2)), "best")
    with pytest.raises(ValueError, match="threshold must be in"):
        match(np.zeros((2, 2)), threshold=1.5)
    with pytest.raises(ValueError, match="2-D float"):
        match(np.zeros(3))
    with pytest.raises(ValueError, match="do not apply to policy 'max'"):
        match(np.zeros((2, 2)), "max", pool_size=1)
    with pytest.raises(ValueError, match="max_bytes"):
        topk_correlation(a, b, max_bytes=4)
    with pytest.raises(ValueError, match="top_tokens_b has 1 features"):
        junk_filter(Matches([0], [3], [0.5]), np.zeros((1, 2), int),
                    np.zeros((1, 2), int), [1])
    assert isinstance(top_activations(a, k=1), TopActivations)


# ------------------------------------------------------- the rule: a hand-made case
# Two tokenizers: ' whale' and ' ship' are in both under different ids; id 3 is ' sea'
# in A but ' the' in B, so comparing ids instead of texts would pair a1 with b1.
TEXTS_A = ["<s>", " whale", ".", " sea", " ship", "ing"]  # special: 0
TEXTS_B = [" ship", " whale", "<pad>", " the", " ,", "ed"]  # special: 2
ROW_TOKENS_A = [1, 3, 4, 2, 5, 1]  # token id of each code row of A
ROW_TOKENS_B = [1, 0, 3, 5, 4, 1]
TOP_ROWS_A = [[0, 5],  # a0: ' whale', ' whale'
              [1, -1],  # a1: ' sea'
              [4, -1],  # a2: 'ing'
              [2, 3]]  # a3: ' ship', '.' (junk)
TOP_ROWS_B = [[5, -1],  # b0: ' whale'
              [2, -1],  # b1: ' the'
              [3, 4],  # b2: 'ed', ' ,' (junk)
              [1, -1],  # b3: ' ship'
              [-1, -1]]  # b4: dead, no activations
# one_to_one pairs a_i with b_i; b4 is dead; (2, 2) is exactly at the default threshold
HAND_CORR = np.array([[0.9, 0.0, 0.0, 0.0, np.nan],
                      [0.0, 0.5, 0.0, 0.0, np.nan],
                      [0.0, 0.0, 0.1, 0.0, np.nan],
                      [0.0, 0.0, 0.0, 0.3, np.nan]])


class Decoder:
    """A fake tokenizer decode that records what it was asked."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def __call__(self, ids):
        self.calls.append(np.array(ids))
        return np.array([self.texts[i] for i in ids], dtype=object)


def side_tokens(texts, specials, row_tokens, top_rows):
    top = TopActivations(np.array(top_rows), np.ones(np.shape(top_rows), np.float32))
    decode = Decoder(texts)
    return top_tokens(top, row_tokens, junk_ids(texts, specials), decode), decode


@pytest.fixture
def hand_tokens():
    tokens_a, _ = side_tokens(TEXTS_A, [0], ROW_TOKENS_A, TOP_ROWS_A)
    tokens_b, _ = side_tokens(TEXTS_B, [2], ROW_TOKENS_B, TOP_ROWS_B)
    return tokens_a, tokens_b


def pairs_of(p):
    return list(zip(p.matches.a.tolist(), p.matches.b.tolist()))


def test_pair_counts_each_step_of_the_hand_made_case(hand_tokens):
    p = pair(HAND_CORR, Rule(shared_token=True), *hand_tokens)
    assert isinstance(p, Pairing)
    assert list(p.counts) == ["n_policy", "mean_corr_before", "n_threshold", "n_junk",
                              "n_shared_token", "n_pairs", "mean_corr_after",
                              "unique_a_fraction"]
    assert p.counts["n_policy"] == 4  # b4 is dead: never matched
    assert p.counts["mean_corr_before"] == pytest.approx((0.9 + 0.5 + 0.1 + 0.3) / 4)
    assert p.counts["n_threshold"] == 3  # (2, 2) at exactly 0.1 is dropped
    assert p.counts["n_junk"] == 2  # a3 has '.' among its top tokens
    assert p.counts["n_shared_token"] == 1  # a1 ' sea' vs b1 ' the' (same id 3)
    assert p.counts["n_pairs"] == 1 and pairs_of(p) == [(0, 0)]
    assert p.counts["mean_corr_after"] == pytest.approx(0.9)
    assert p.counts["unique_a_fraction"] == 1.0
    np.testing.assert_array_equal(p.matches.corr, [0.9])


@pytest.mark.parametrize("junk, shared, threshold, expect", [
    (False, False, 0.1, [(0, 0), (1, 1), (3, 3)]),
    (True, False, 0.1, [(0, 0), (1, 1)]),  # a3: junk '.' on the A side
    (False, True, 0.1, [(0, 0), (3, 3)]),  # ' ship' is id 4 in A, id 0 in B
    (True, True, 0.1, [(0, 0)]),
    (True, False, 0.0, [(0, 0), (1, 1)]),  # (2, 2) passes 0.0 but b2 has junk ' ,'
    (False, False, 0.0, [(0, 0), (1, 1), (2, 2), (3, 3)]),
    (False, False, 0.0999, [(0, 0), (1, 1), (2, 2), (3, 3)]),
])
def test_pair_filters_on_and_off(hand_tokens, junk, shared, threshold, expect):
    p = pair(HAND_CORR, Rule("one_to_one", threshold, junk, shared), *hand_tokens)
    assert pairs_of(p) == expect
    c = p.counts
    assert c["n_threshold"] == (4 if threshold < 0.1 else 3)
    assert c["n_junk"] == (c["n_threshold"] if not junk else c["n_junk"])
    assert c["n_shared_token"] == (c["n_junk"] if not shared else c["n_shared_token"])
    assert c["n_pairs"] == len(expect)


def test_threshold_is_strict_in_pair():
    corr = np.array([[0.25, 0.0], [0.0, 0.5]])
    keep = Rule("max", 0.25, junk_filter=False)
    assert pairs_of(pair(corr, keep)) == [(1, 1)]
    assert pair(corr, Rule("max", 0.2499, junk_filter=False)).matches.n == 2


def test_pair_with_nothing_left_has_nan_means(hand_tokens):
    p = pair(HAND_CORR, Rule(threshold=0.95), *hand_tokens)
    assert p.matches.n == 0 and p.counts["n_policy"] == 4
    for key in ("mean_corr_after", "unique_a_fraction"):
        assert np.isnan(p.counts[key])


def test_n_policy_counts_every_policy_pair_even_at_minus_one():
    corr = np.array([[-1.0, 0.5], [-1.0, 0.2]])  # b0's best partner is a0 at exactly -1
    p = pair(corr, Rule("max", junk_filter=False))
    assert p.counts["n_policy"] == 2 and p.counts["mean_corr_before"] == -0.25
    assert p.counts["n_threshold"] == 1 and pairs_of(p) == [(0, 1)]


def test_pair_matches_are_sorted_by_b_and_mean_corr_before_in_that_order():
    rng = np.random.default_rng(8)
    corr = rng.uniform(-1, 1, (30, 20)).astype(np.float32)
    for policy in POLICIES:
        p = pair(corr, Rule(policy, -1.0, junk_filter=False))
        assert (np.diff(p.matches.b) >= 0).all()
        assert p.counts["mean_corr_before"] == p.matches.mean_corr  # nothing dropped


def test_match_is_pair_without_filters_for_every_policy(data):
    x, y = data
    corr = correlation(sp.csr_array(x), sp.csr_array(y))
    top = topk_correlation(sp.csr_array(x), sp.csr_array(y), k=2)
    for policy, threshold in itertools.product(POLICIES, (-1.0, 0.0, 0.05, 0.2)):
        for c in ((corr,) if policy in ("hungarian", "sinkhorn") else (corr, top)):
            m = match(c, policy, threshold)
            p = pair(c, Rule(policy, threshold, junk_filter=False, shared_token=False))
            for name in ("a", "b", "corr"):
                np.testing.assert_array_equal(getattr(m, name),
                                              getattr(p.matches, name))
            assert p.counts["n_pairs"] == m.n


def test_match_defaults_come_from_rule():
    params = inspect.signature(match).parameters
    assert params["policy"].default == Rule().policy
    assert params["threshold"].default == Rule().threshold
    corr = np.array([[Rule().threshold, 0.0], [0.0, 0.5]])
    assert list(match(corr).a) == [1]  # at the default threshold: dropped


def test_pair_hungarian_options_pass_through():
    corr = np.random.default_rng(4).uniform(0.2, 1.0, (6, 4))
    p = pair(corr, Rule("hungarian", 0.0, junk_filter=False), pool_a=[0, 1, 2],
             pool_b=[1, 3])
    assert set(p.matches.a) <= {0, 1, 2} and list(p.matches.b) == [1, 3]
    with pytest.raises(ValueError, match="do not apply to policy 'max'"):
        pair(corr, Rule("max", junk_filter=False), pool_size=2)


# ------------------------------------------------------- Rule


def test_rule_defaults():
    rule = Rule()
    assert (rule.policy, rule.threshold, rule.junk_filter, rule.shared_token) == (
        "one_to_one", 0.1, True, False)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "best"},
     "unknown policy 'best'; choose one of max, one_to_one, mutual, hungarian, lan"),
    ({"policy": None}, "unknown policy None"),
    ({"threshold": 1.5}, r"threshold must be in \[-1, 1\].*got 1.5"),
    ({"threshold": -1.01}, r"threshold must be in \[-1, 1\].*got -1.01"),
    ({"threshold": float("nan")}, r"threshold must be in \[-1, 1\].*got nan"),
    ({"threshold": "0.1"}, r"threshold must be in \[-1, 1\].*got '0.1'"),
    ({"threshold": True}, r"threshold must be in \[-1, 1\].*got True"),
    ({"junk_filter": 1}, "junk_filter must be True or False; got 1"),
    ({"shared_token": "yes"}, "shared_token must be True or False; got 'yes'"),
])
def test_rule_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rule(**kwargs)


def test_rule_accepts_edges_and_numpy_numbers():
    assert Rule(threshold=-1.0).threshold == -1.0 and Rule(threshold=1).threshold == 1
    assert Rule(threshold=np.float32(0.5), junk_filter=np.bool_(False)).threshold == 0.5


def test_filter_on_without_tokens_raises(hand_tokens):
    tokens_a, tokens_b = hand_tokens
    with pytest.raises(ValueError,
                       match="junk_filter needs the top tokens.*tokens_a and tokens_b"):
        pair(HAND_CORR, Rule())
    with pytest.raises(ValueError, match="shared_token needs the top tokens"):
        pair(HAND_CORR, Rule(junk_filter=False, shared_token=True), tokens_a)
    with pytest.raises(ValueError,
                       match="tokens_b describes 4 features but corr has 5"):
        pair(HAND_CORR, Rule(), tokens_a, tokens_a)
    with pytest.raises(ValueError, match="rule must be a Rule"):
        pair(HAND_CORR, "one_to_one")


def test_importing_the_package_does_not_import_torch():
    code = "import sys, saeuniv.core.matching; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------- tokens


def test_top_tokens_from_a_fake_decode():
    tokens, decode = side_tokens(TEXTS_A, [0], ROW_TOKENS_A, TOP_ROWS_A)
    np.testing.assert_array_equal(tokens.ids, [[1, 1], [3, -1], [5, -1], [4, 2]])
    assert tokens.ids.dtype == np.int64 and tokens.text.dtype == object
    assert tokens.text.tolist() == [[" whale", " whale"], [" sea", ""], ["ing", ""],
                                    [" ship", "."]]
    np.testing.assert_array_equal(tokens.junk, [[0, 0], [0, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(tokens.any_junk, [False, False, False, True])
    assert len(decode.calls) == 1  # each distinct id decoded once, never the padding
    np.testing.assert_array_equal(decode.calls[0], [1, 2, 3, 4, 5])


def test_top_tokens_refuses_bad_inputs():
    top = TopActivations(np.array(TOP_ROWS_A), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="decode must map a 1-D array of 5 token ids"):
        top_tokens(top, ROW_TOKENS_A, [0], lambda ids: ["x"])
    with pytest.raises(ValueError, match="token_ids must be 1-D"):
        top_tokens(top, ROW_TOKENS_A[:3], [0], Decoder(TEXTS_A))
    with pytest.raises(ValueError, match="junk_ids must be a 1-D array"):
        top_tokens(top, ROW_TOKENS_A, [[0]], Decoder(TEXTS_A))
    with pytest.raises(ValueError, match="top must be a TopActivations"):
        top_tokens(np.array(TOP_ROWS_A), ROW_TOKENS_A, [0], Decoder(TEXTS_A))


def test_top_tokens_take(hand_tokens):
    tokens = hand_tokens[0]
    sub = tokens.take([3, 0])
    assert isinstance(sub, TopTokens) and sub.n_features == 2
    np.testing.assert_array_equal(sub.ids, tokens.ids[[3, 0]])
    assert sub.text.tolist() == [[" ship", "."], [" whale", " whale"]]
    np.testing.assert_array_equal(sub.junk, [[False, True], [False, False]])
    mask = tokens.take(np.array([False, True, False, True]))
    np.testing.assert_array_equal(mask.ids, tokens.ids[[1, 3]])
    assert tokens.take([]).ids.shape == (0, 2)
    with pytest.raises(ValueError, match="integer indices or a boolean mask"):
        tokens.take([0.5])


def test_top_tokens_validates_shapes_and_padding():
    ids, text = np.array([[1, -1]]), np.array([["a", ""]], object)
    junk = np.zeros((1, 2), bool)
    TopTokens(ids, text, junk)
    with pytest.raises(ValueError, match="one 2-D shape"):
        TopTokens(ids, text[:, :1], junk)
    with pytest.raises(ValueError, match="integer ids and boolean junk"):
        TopTokens(ids, text, junk.astype(int))
    with pytest.raises(ValueError, match="junk False and text '' where padded"):
        TopTokens(ids, text, np.array([[False, True]]))
    with pytest.raises(ValueError, match="junk False and text '' where padded"):
        TopTokens(ids, np.array([["a", "b"]], object), junk)


def test_shares_text_compares_text_not_ids():
    no_junk = np.zeros((2, 2), bool)
    a = TopTokens(np.array([[3, -1], [7, 8]]),
                  np.array([[" sea", ""], ["x", "y"]], object), no_junk)
    b = TopTokens(np.array([[3, -1], [1, -1]]),
                  np.array([[" the", ""], ["y", ""]], object), no_junk)
    np.testing.assert_array_equal(shares_text(a, b), [False, True])  # padding '' aside
    with pytest.raises(ValueError, match="pairwise"):
        shares_text(a, b.take([0]))


def test_junk_ids_on_a_small_vocabulary():
    texts = ["<s>", " ", "\n", "hello", " .", ",", "(", " world", "", "--", "'",
             "<pad>", "\t)", "..."]
    ids = junk_ids(texts, [0, 11])
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 1, 2, 4, 5, 6, 8, 10, 11, 12]  # '--', '...' are not junk
    no_specials = np.array([], np.int64)
    assert junk_ids(texts, no_specials).tolist() == [1, 2, 4, 5, 6, 8, 10, 12]
    assert {"", ".", ",", "(", ")"} <= JUNK_TEXTS
    with pytest.raises(ValueError,
                       match=r"special ids \[14\] are outside the vocabulary of 14"):
        junk_ids(texts, [0, 14])
