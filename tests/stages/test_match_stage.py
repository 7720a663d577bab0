"""The match stage on tiny models: matching on a prefix of one extraction, and pipelines
that share their upstream artefacts."""

from __future__ import annotations

import numpy as np
import pytest

from saeuniv.config import ConfigError
from saeuniv.core import matching
from saeuniv.extract import load_codes
from saeuniv.pipeline import Pipeline
from saeuniv.stages import match
from saeuniv.store import Store

UPSTREAM = ("corpus", "tokenizer", "windows", "model", "sae", "codes")


def _entries(store):
    return {k: len(list((store / k).glob("*/manifest.json"))) for k in UPSTREAM}


def test_match_n_tokens_matches_on_a_prefix_of_one_extraction(tiny_run, own_store):
    cfg = tiny_run["cfg"].replace(**{"match.junk_filter": False, "match.n_tokens": 700})
    before = _entries(own_store)
    pipe = Pipeline(cfg, Store(own_store))
    la, lb = pipe.pairs[-1]
    entry = match.entry(pipe, la, lb)
    assert _entries(own_store) == before  # no new codes (nor models, SAEs, windows)
    assert entry.meta["n_tokens"] == 700
    codes_a = load_codes(pipe.a.codes[la])
    codes_b = load_codes(pipe.b.codes[lb])
    assert codes_a.shape[0] >= 1500
    direct = matching.match(matching.correlation(codes_a[:700], codes_b[:700]),
                            policy=cfg.match.policy, threshold=cfg.match.threshold)
    got = match.load(entry)
    np.testing.assert_array_equal(got.a, direct.a)
    np.testing.assert_array_equal(got.b, direct.b)
    np.testing.assert_allclose(got.corr, direct.corr, rtol=1e-6)
    every_row = match.load(match.entry(
        pipe.with_analysis(cfg.replace(**{"match.n_tokens": 0})), la, lb))
    assert not np.array_equal(every_row.corr, got.corr)  # the prefix is what was matched
    # the premise: the windows of a smaller budget are a prefix of a larger budget's
    small = Pipeline(tiny_run["cfg"].replace(**{"extract.n_tokens": 700}), Store(own_store))
    rows = load_codes(small.a.codes[la])
    assert rows.shape[0] >= 700
    np.testing.assert_allclose(rows.toarray(), codes_a[:rows.shape[0]].toarray(), atol=1e-5)
    with pytest.raises(ConfigError, match=r"match.n_tokens=2000 exceeds extract.n_tokens=1500; "
                       r"raise extract.n_tokens"):
        tiny_run["cfg"].replace(**{"match.n_tokens": 2000})


def test_the_stored_counts_are_the_rule_applied_to_the_stored_codes(tiny_pipe):
    """Each layer pair's entry holds what the core's one matching function gives on the
    layer pair's codes, with the token filters of the config."""
    pipe = tiny_pipe
    rule = pipe.cfg.match.rule()
    assert rule.junk_filter  # the tiny config filters junk tokens
    for la, lb in pipe.pairs[:2]:
        entry = match.entry(pipe, la, lb)
        codes_a, codes_b = (pipe.analysis_codes(s.codes[layer])
                            for s, layer in ((pipe.a, la), (pipe.b, lb)))
        top_a, top_b = match.load_top(entry)
        paired = matching.pair(matching.correlation(codes_a, codes_b), rule,
                               pipe.a.top_tokens(top_a), pipe.b.top_tokens(top_b))
        got = match.load(entry)
        np.testing.assert_array_equal(got.a, paired.matches.a)
        np.testing.assert_array_equal(got.b, paired.matches.b)
        for key, value in paired.counts.items():
            assert entry.meta[key] == (None if value != value else value), key
        assert entry.meta["n_junk"] <= entry.meta["n_threshold"] <= entry.meta["n_policy"]


def test_with_analysis_shares_the_artefacts_and_refuses_upstream_changes(tiny_pipe):
    cfg = tiny_pipe.cfg
    codes = tiny_pipe.a.codes
    other = tiny_pipe.with_analysis(cfg.replace(**{"match.threshold": 0.3,
                                                   "similarity.n_perm": 19}))
    assert other.a.codes is codes and other.up is tiny_pipe.up
    assert other.cfg.match.threshold == 0.3
    with pytest.raises(ValueError, match=r"differs upstream of matching in \['extract'\]"):
        tiny_pipe.with_analysis(cfg.replace(**{"extract.n_tokens": 700}))
