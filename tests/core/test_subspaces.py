"""Semantic subspaces, the pure core: phrase spans, feature labels, category pairs and both
nulls."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saeuniv.core import matching, metrics, subspaces
from saeuniv.core.significance import fdr_bh
from saeuniv.core.subspaces import ConceptSet

RULE = matching.Rule("one_to_one", 0.1, junk_filter=False)


# -- phrases on character spans --------------------------------------------------

def test_find_phrases_matches_multi_word_phrases_whole_and_longest_first():
    text = "A red blood cell.  Blood, bloodline; red\nblood  cell! The cellar."
    phrases = ["blood", "red blood cell", "cell"]
    found = [(text[s:e], phrases[p]) for s, e, p in subspaces.find_phrases(text, phrases)]
    assert found == [("red blood cell", "red blood cell"), ("Blood", "blood"),
                     ("red\nblood  cell", "red blood cell")]  # not "bloodline", not "cellar"


def test_capitalised_phrases_match_only_capitalised_and_lower_case_any_case():
    text = "In May we may go. Last week, last WEEK and lastweek."
    phrases = ["May", "last week"]
    found = [text[s:e] for s, e, _ in subspaces.find_phrases(text, phrases)]
    assert found == ["May", "Last week", "last WEEK"]


def test_occurrence_hits_need_a_character_of_overlap():
    occ = subspaces.occurrences(["x New York y", "New York"], ConceptSet(
        "t", ("places",), (("New York",),)))
    assert occ.count(0) == 2 and occ.base.tolist() == [0, 12]
    spans = [[1, 5],    # " New": overlaps [2, 10)
             [5, 10],   # " York"
             [10, 12],  # " y": starts where the phrase ends
             [0, 2],    # "x ": ends where it starts
             [12, 15],  # "New" of the second text
             [-1, -1],  # BOS: no text
             [16, 16]]  # empty span
    hit, phrase = occ.hits(0, spans)
    assert hit.tolist() == [True, True, False, False, True, False, False]
    assert phrase.tolist() == [0, 0, -1, -1, 0, -1, -1]


def _word_tokens(text: str, split: dict[str, int]) -> list[tuple[int, int]]:
    """Character spans of a toy tokenizer: words, some split into several pieces."""
    spans = []
    for m in re.finditer(r"\w+|[^\w\s]", text):
        pieces = split.get(m.group(), 1)
        cuts = np.linspace(m.start(), m.end(), pieces + 1).round().astype(int)
        spans += list(zip(cuts[:-1], cuts[1:]))
    return spans


def test_labelling_finds_the_feature_a_multi_token_phrase_drives():
    """A synthetic corpus where "red blood cell" (tokenized into 5 pieces) drives feature
    0, "blood" alone drives feature 1, and feature 2 fires on unrelated words."""
    rng = np.random.default_rng(0)
    filler = ["the", "ship", "sails", "north", "and", "the", "crew", "sings"]
    docs = []
    for _ in range(30):
        words = list(rng.choice(filler, 12))
        words.insert(int(rng.integers(0, 12)), "red blood cell")
        words.insert(int(rng.integers(0, 12)), "blood")
        docs.append(" ".join(words) + ".")
    concepts = ConceptSet("t", ("biology", "nautical"),
                          (("blood", "red blood cell", "cell"), ("harpoon",)))
    occ = subspaces.occurrences(docs, concepts)
    spans = np.asarray([(occ.base[d] + s, occ.base[d] + e) for d, text in enumerate(docs)
                        for s, e in _word_tokens(text, {"blood": 2, "cell": 2})])
    text = "".join(docs)
    tok = np.asarray([text[s:e] for s, e in spans])
    in_phrase = np.zeros(len(spans), bool)
    for d, doc in enumerate(docs):
        start = occ.base[d] + doc.index("red blood cell")
        in_phrase |= (spans[:, 0] >= start) & (spans[:, 1] <= start + len("red blood cell"))
    lone_blood = np.isin(tok, ["bl", "ood"]) & ~in_phrase
    codes = np.zeros((len(spans), 3))
    inner = np.flatnonzero(in_phrase & np.isin(tok, ["ood", "ce", "ll"]))  # not the first token
    codes[inner, 0] = rng.uniform(1, 2, inner.size)
    codes[lone_blood, 1] = rng.uniform(1, 2, lone_blood.sum())
    other = np.flatnonzero(np.isin(tok, ["ship", "crew"]))
    codes[other, 2] = rng.uniform(1, 2, other.size)
    top = matching.top_activations(__import__("scipy").sparse.csr_array(codes), 5)
    lab = subspaces.label_features(top.rows, spans, occ)
    assert lab.hits[:, 0].tolist() == [5, 5, 0] and lab.hits[:, 1].tolist() == [0, 0, 0]
    assert concepts.phrases[0][lab.phrase[0, 0]] == "red blood cell"
    assert concepts.phrases[0][lab.phrase[1, 0]] == "blood"
    assert lab.phrase[2].tolist() == [-1, -1]
    assert lab.features(0).tolist() == [0, 1] and lab.features(1).size == 0
    assert concepts.multi_word(0, lab.phrase[0, 0]) and not concepts.multi_word(0, lab.phrase[1, 0])
    strict = subspaces.label_features(top.rows, spans, occ, min_hits=6)
    assert not strict.member.any()


def test_label_features_rejects_rows_beyond_the_spans():
    occ = subspaces.occurrences(["a b"], ConceptSet("t", ("x",), (("a",),)))
    with pytest.raises(ValueError, match="reaches row 5"):
        subspaces.label_features(np.array([[5]]), np.zeros((3, 2)), occ)
    with pytest.raises(ValueError, match="min_hits"):
        subspaces.label_features(np.array([[0]]), np.zeros((3, 2)), occ, min_hits=0)


# -- nulls and q-values --------------------------------------------------------------

def _aligned(rng, n, d, noise):
    A = rng.normal(size=(n, d))
    R = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return A, A @ R + noise * rng.normal(size=(n, d))


@pytest.mark.parametrize("name, kw", [("svcca", {"k": subspaces.svcca_k(17)}), ("rsa", {}),
                                      ("cka", {"debiased": False}),
                                      ("cka", {"debiased": True})])
def test_random_subspace_draws_equal_the_metrics_computed_directly(name, kw):
    rng = np.random.default_rng(1)
    A, B = _aligned(rng, 300, 24, 1.0)
    pool_a, pool_b = rng.permutation(300)[:120], rng.permutation(300)[:120]
    r = subspaces.random_subspace_null(name, A, B, pool_a, pool_b, 17, 40, 5, 0.5, **kw)
    draws = np.random.default_rng([5, 1])
    for i in range(40):
        pick = draws.choice(120, 17, replace=False)
        direct = getattr(metrics, name)(A[pool_a[pick]], B[pool_b[pick]], **kw)
        assert r.null[i] == pytest.approx(direct, abs=1e-10)
    again = subspaces.random_subspace_null(name, A, B, pool_a, pool_b, 17, 40, 5, 0.5, **kw)
    assert np.array_equal(r.null, again.null)
    assert r.p == (1 + np.sum(r.null >= 0.5)) / 41 and r.seed == 5


def test_category_cka_is_debiased_where_the_biased_one_is_near_one_for_anything():
    """Unrelated isotropic vectors, 20 pairs in 600 dimensions: the biased linear CKA is
    1 / (1 + n / d) = 0.968 in expectation, for the category and every random subspace
    alike; the debiased one is near 0. Both nulls agree that nothing is there."""
    rng = np.random.default_rng(5)
    n_pool, d, n = 400, 600, 20
    A, B = rng.normal(size=(n_pool, d)), rng.normal(size=(n_pool, d))
    biased = subspaces.score_category("c", A, B, _pairs(np.arange(n)), n, n, np.arange(n_pool),
                                      np.arange(n_pool), ("cka",), 99, 0, cka_debiased=False)
    default = subspaces.score_category("c", A, B, _pairs(np.arange(n)), n, n, np.arange(n_pool),
                                       np.arange(n_pool), ("cka",), 99, 0)
    b, u = biased.metrics["cka"], default.metrics["cka"]
    assert (b["debiased"], u["debiased"]) == (False, True)
    assert b["random"]["null_mean"] == pytest.approx(1 / (1 + n / d), abs=0.01)
    assert b["observed"] > 0.95 and abs(u["observed"]) < 0.3
    assert abs(u["random"]["null_mean"]) < 0.03 and abs(u["shuffle"]["null_mean"]) < 0.03
    assert u["observed"] == pytest.approx(metrics.cka(A[:n], B[:n], debiased=True))
    for r in (b, u):
        assert r["random"]["p"] > 0.05 and r["shuffle"]["p"] > 0.05


def test_random_subspaces_need_a_pool_larger_than_the_draw():
    A = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="pool holds 6 matched pairs"):
        subspaces.random_subspace_null("cka", A, A, np.arange(6), np.arange(6), 6, 10, 0, 0.5)


def test_svcca_keeps_a_quarter_of_the_pairs_and_never_one_direction():
    assert [subspaces.svcca_k(n) for n in (5, 8, 40, 41)] == [2, 2, 10, 10]
    assert subspaces.svcca_k(40, 3) == 3


def _pairs(idx):
    return matching.Matches(idx, idx, np.ones(len(idx)))


def test_a_category_whose_features_agree_beyond_the_rest_is_significant_against_both():
    rng = np.random.default_rng(2)
    n, d = 400, 32
    A = rng.normal(size=(n, d))
    B = A @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 2.0 * rng.normal(size=(n, d))
    concept = np.arange(30)
    B[concept] = A[concept] @ np.linalg.qr(rng.normal(size=(d, d)))[0] \
        + 0.1 * rng.normal(size=(30, d))
    s = subspaces.score_category("c", A, B, _pairs(concept), 30, 30, np.arange(n),
                                 np.arange(n), n_perm=199, seed=0)
    assert s.status == "ok"
    for name in ("svcca", "rsa", "cka"):
        r = s.metrics[name]
        assert r["shuffle"]["p"] == r["random"]["p"] == 1 / 200, name
        assert r["observed"] > r["random"]["null_mean"] > r["shuffle"]["null_mean"], name


def test_shuffled_labels_are_not_significant_against_random_subspaces():
    """Features given random labels: every matched pair agrees as much as any other, so a
    'category' is a random subspace and its p-value against that null is uniform, although
    it beats the shuffled-pairing null (which is why both are reported)."""
    rng = np.random.default_rng(3)
    n, d = 300, 24
    A, B = _aligned(rng, n, d, 1.5)
    p_random, p_shuffle = [], []
    for trial in range(40):
        labelled = rng.permutation(n)[:20]
        s = subspaces.score_category("shuffled", A, B, _pairs(labelled), 20, 20,
                                     np.arange(n), np.arange(n), metric_names=("rsa", "cka"),
                                     n_perm=99, seed=trial)
        p_random += [s.metrics[m]["random"]["p"] for m in ("rsa", "cka")]
        p_shuffle += [s.metrics[m]["shuffle"]["p"] for m in ("rsa", "cka")]
    p_random, p_shuffle = np.asarray(p_random), np.asarray(p_shuffle)
    assert np.mean(p_random < 0.05) <= 0.125
    assert 0.35 < p_random.mean() < 0.65
    assert not np.any(fdr_bh(p_random) < 0.05)
    assert np.mean(p_shuffle < 0.05) > 0.9


def test_a_category_with_too_few_pairs_is_reported_not_scored():
    A = np.random.default_rng(0).normal(size=(50, 8))
    s = subspaces.score_category("tiny", A, A, _pairs(np.arange(4)), 9, 7, np.arange(50),
                                 np.arange(50), min_pairs=5)
    assert s.status == "too few pairs (4 < min_pairs=5)" and s.metrics == {}
    assert (s.n_features_a, s.n_features_b, s.n_pairs) == (9, 7, 4)


def test_category_pairs_match_only_within_the_category():
    corr = np.array([[0.9, 0.2], [0.3, 0.8], [0.5, 0.4]])
    m = subspaces.category_pairs(corr, [4, 7, 9], [2, 5], RULE)
    assert list(zip(m.a.tolist(), m.b.tolist())) == [(4, 2), (7, 5)]
    assert subspaces.category_pairs(np.zeros((0, 2)), [], [2, 5], RULE).n == 0
    with pytest.raises(ValueError, match="expected \\(3, 2\\)"):
        subspaces.category_pairs(corr.T, [4, 7, 9], [2, 5], RULE)


def test_category_pairs_apply_the_layer_pairs_token_filters():
    """The rule of the whole layer pair, junk filter included, read off the top tokens of
    ALL features (category features are a subset, indexed into all)."""
    corr = np.array([[0.9, 0.2], [0.3, 0.8]])
    top = matching.TopActivations(np.array([[0], [1], [2], [3], [4], [5], [6], [7], [8], [9]]),
                                  np.ones((10, 1), np.float32))
    row_ids = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])

    def decode(ids):
        return np.asarray([f"t{i}" for i in ids], dtype=object)

    tokens = matching.top_tokens(top, row_ids, [17], decode)  # feature 7 fires on junk
    rule = matching.Rule("one_to_one", 0.1, junk_filter=True)
    m = subspaces.category_pairs(corr, [4, 7], [2, 5], rule, tokens, tokens)
    assert list(zip(m.a.tolist(), m.b.tolist())) == [(4, 2)]  # (7, 5) dropped: junk
    assert subspaces.category_pairs(corr, [4, 7], [2, 5], RULE, tokens, tokens).n == 2
    with pytest.raises(ValueError, match="tokens"):
        subspaces.category_pairs(corr, [4, 7], [2, 5], rule)


def test_random_subspaces_of_other_metrics_are_scored_draw_by_draw():
    rng = np.random.default_rng(4)
    A, B = _aligned(rng, 120, 16, 1.0)
    r = subspaces.random_subspace_null("procrustes", A, B, np.arange(120), np.arange(120), 15,
                                       5, 2, 0.5)
    draws = np.random.default_rng([2, 1])
    direct = [metrics.procrustes(A[p], B[p]) for p in
              (draws.choice(120, 15, replace=False) for _ in range(5))]
    assert r.null.tolist() == pytest.approx(direct, abs=1e-12)


def test_label_features_counts_rank_zero_rows_and_picks_the_most_hit_phrase():
    occ = subspaces.occurrences(["cat dog cat"], ConceptSet(
        "t", ("animals",), (("cat", "dog"),)))
    spans = [[0, 3], [4, 7], [8, 11]]  # "cat", "dog", "cat"
    top = [[0, 1, 2],     # cat twice, dog once: cat
           [1, 0, -1],    # one each: dog, hit by the higher-ranked activation
           [-1, -1, -1]]  # no activations
    lab = subspaces.label_features(top, spans, occ, min_hits=2)
    assert lab.hits[:, 0].tolist() == [3, 2, 0]
    assert lab.phrase[:, 0].tolist() == [0, 1, -1]
    assert lab.member[:, 0].tolist() == [True, True, False]  # hits == min_hits belongs
    assert subspaces.label_features(top, spans, occ, min_hits=3).member[:, 0].tolist() == [
        True, False, False]
    assert subspaces.label_features([[0]], spans, occ).hits.tolist() == [[1]]  # row 0 counts


def test_a_category_with_exactly_min_pairs_is_scored_with_the_seed_it_is_given():
    rng = np.random.default_rng(1)
    A, B = _aligned(rng, 40, 6, 0.5)

    def score(seed):
        return subspaces.score_category("c", A, B, _pairs(np.arange(8)), 8, 8, np.arange(40),
                                        np.arange(40), ("rsa",), n_perm=50, seed=seed,
                                        min_pairs=8)

    s1, s2 = score(1), score(2)
    assert s1.status == "ok" and s1.n_pairs == 8
    assert s1.metrics == score(1).metrics  # seeded: the same nulls again
    assert s1.metrics["rsa"]["observed"] == s2.metrics["rsa"]["observed"]
    assert s1.metrics["rsa"]["shuffle"]["null_mean"] != s2.metrics["rsa"]["shuffle"]["null_mean"]
    assert s1.metrics["rsa"]["random"]["null_mean"] != s2.metrics["rsa"]["random"]["null_mean"]


def test_the_shuffle_null_runs_on_a_device_and_agrees_with_numpy():
    rng = np.random.default_rng(3)
    A, B = _aligned(rng, 60, 6, 0.5)

    def score(device):
        return subspaces.score_category("c", A, B, _pairs(np.arange(20)), 20, 20,
                                        np.arange(60), np.arange(60), ("svcca", "rsa", "cka"),
                                        n_perm=40, seed=1, min_pairs=8, k=3, device=device)

    numpy_, torch_cpu = score(None), score("cpu")
    for name in ("svcca", "rsa", "cka"):
        ref, dev = numpy_.metrics[name], torch_cpu.metrics[name]
        assert dev["observed"] == ref["observed"] and dev["random"] == ref["random"]
        assert abs(dev["shuffle"]["null_mean"] - ref["shuffle"]["null_mean"]) < 1e-6
        assert dev["shuffle"]["p"] == ref["shuffle"]["p"]
    with pytest.raises(ValueError, match="not a torch device"):
        score("tpu")
