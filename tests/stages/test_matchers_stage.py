"""Matchers beyond co-activation in the pipeline, on tiny models: residual samples that line
up with the codes, the decoder basis, the sinkhorn policy, and ``match.compare`` (every
stored number equal to the core's on the same inputs, and what a run logs)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from saeuniv import matchers, residuals
from saeuniv.cells import cell_metrics
from saeuniv.config import ConfigError
from saeuniv.core import matching
from saeuniv.extract import load_codes
from saeuniv.pipeline import Pipeline
from saeuniv.stages import match, similarity
from saeuniv.store import Store

ROWS = 800


def compare_pipe(tiny_run, store, **more):
    cfg = tiny_run["cfg"].replace(**{"match.compare": True, "match.stitch_rows": ROWS,
                                     **more})
    return Pipeline(cfg, Store(store))


def test_residual_rows_are_the_code_rows_of_the_same_positions(tiny_run, own_store):
    pipe = compare_pipe(tiny_run, own_store)
    for side in pipe.sides:
        layer = side.used_layers[-1]
        x = residuals.load(side.residual_rows[ROWS][layer])
        assert x.shape == (ROWS, side.info.d_model) and x.dtype == np.float32
        sae = side.saes[layer]
        import torch

        with torch.no_grad():
            codes = sae.encode(torch.as_tensor(x)).numpy()
        stored = load_codes(side.codes[layer])[:ROWS].toarray()
        np.testing.assert_allclose(codes, stored, atol=1e-4)


def test_compare_entry_holds_what_the_core_gives(tiny_run, own_store):
    pipe = compare_pipe(tiny_run, own_store)
    la, lb = pipe.pairs[-1]
    e = match.entry(pipe, la, lb)
    cmp = match.compare_entry(pipe, la, lb, e)
    sets, meta = matchers.load(cmp), cmp.meta
    codes_a, codes_b = (pipe.analysis_codes(s.codes[layer])
                        for s, layer in ((pipe.a, la), (pipe.b, lb)))
    corr = matching.correlation(codes_a, codes_b)
    top_a, top_b = match.load_top(e)
    tokens = (pipe.a.top_tokens(top_a), pipe.b.top_tokens(top_b))
    rule = pipe.cfg.match.rule()
    st = matching.stitch(residuals.load(pipe.a.residual_rows[ROWS][la]),
                         residuals.load(pipe.b.residual_rows[ROWS][lb]))
    cos = matching.decoder_cosine(pipe.a.decoder(la), pipe.b.decoder(lb), st)
    ot_rule = matching.Rule("sinkhorn", rule.threshold, rule.junk_filter, rule.shared_token)
    assert pipe.up.shared_tokenizer and matchers.names(pipe) == matchers.MATCHERS
    tl_a = pipe.a.model.model
    assert tl_a.cfg.normalization_type == "LN"
    w_u_a = tl_a.W_U.detach().numpy() * tl_a.ln_final.w.detach().numpy()[:, None]
    vocab = matching.vocab_cosine(pipe.a.decoder(la), w_u_a - w_u_a.mean(0),
                                  pipe.b.decoder(lb), pipe.b.unembedding)
    want = {"correlation": matching.pair(corr, rule, *tokens).matches,
            "decoder": matching.pair(cos, rule, *tokens).matches,
            "transport": matching.pair(corr, ot_rule, *tokens).matches,
            "vocab": matching.pair(vocab, rule, *tokens).matches}
    for name, m in want.items():
        np.testing.assert_array_equal(sets[name].a, m.a, err_msg=name)
        np.testing.assert_array_equal(sets[name].b, m.b, err_msg=name)
        assert meta[f"n_pairs_{name}"] == m.n
    np.testing.assert_array_equal(sets["correlation"].a, match.load(e).a)  # the run's pairs
    assert meta["jaccard_correlation_vs_decoder"] == pytest.approx(
        matching.jaccard(want["correlation"], want["decoder"]), nan_ok=True)
    assert meta["stitch_r2"] == pytest.approx(st.r2_heldout)
    assert meta["jaccard_correlation_vs_vocab"] == pytest.approx(
        matching.jaccard(want["correlation"], want["vocab"]), nan_ok=True)
    fo = matching.fan_out(corr, pipe.cfg.match.split_threshold)
    assert meta["fan_out_a"] == fo.histogram("a")
    assert meta["split_share_a"] == pytest.approx(fo.split_share_a, nan_ok=True)
    stats = matching.cofiring(codes_a, codes_b, want["correlation"])
    assert meta["cofire"] == pytest.approx(float(np.nanmedian(stats["cofire"])))
    assert meta["xrecon_own"] > meta["xrecon_raw"]  # no map: worse than B's own SAE
    assert -1 < meta["xrecon_aligned"] <= meta["xrecon_own"] + 0.05


def test_decoder_basis_and_sinkhorn_policy_pair_as_the_core_does(tiny_run, own_store):
    base = compare_pipe(tiny_run, own_store, **{"match.compare": False})
    la, lb = base.pairs[0]
    plain_key = match.entry(base, la, lb).key
    dec = base.with_analysis(base.cfg.replace(**{"match.basis": "decoder"}))
    e = match.entry(dec, la, lb)
    assert e.key != plain_key and "stitch_r2" in e.meta
    cos, _ = matchers.decoder_cosine(dec, la, lb)
    top_a, top_b = match.load_top(e)
    want = matching.pair(cos, dec.cfg.match.rule(), dec.a.top_tokens(top_a),
                         dec.b.top_tokens(top_b)).matches
    np.testing.assert_array_equal(match.load(e).b, want.b)
    ot = base.with_analysis(base.cfg.replace(**{"match.policy": "sinkhorn",
                                                "match.reg": 0.05}))
    got = match.load(match.entry(ot, la, lb))
    corr = matching.correlation(*(ot.analysis_codes(s.codes[layer])
                                  for s, layer in ((ot.a, la), (ot.b, lb))))
    want = matching.pair(corr, ot.cfg.match.rule(), ot.a.top_tokens(top_a),
                         ot.b.top_tokens(top_b), reg=0.05, reg_m=None, mass=0.5).matches
    np.testing.assert_array_equal(got.a, want.a)
    # options of an unused policy or basis do not change the keys of existing results
    same = base.with_analysis(base.cfg.replace(**{"match.reg": 0.3, "match.stitch": "affine"}))
    assert match.entry(same, la, lb).key == plain_key


def test_a_run_with_compare_logs_agreement_fan_out_and_scores_by_matcher(tiny_run, own_store,
                                                                          own_tracking):
    from saeuniv import cli

    args = tiny_run["args"] + ["--set", "match.compare=true", "--set",
                               f"match.stitch_rows={ROWS}"]
    assert cli.main(args) == 0
    runs = mlflow.search_runs(search_all_experiments=True)
    m = runs[runs["tags.saeuniv.stage"] == "match"].iloc[0]
    assert 0 <= m["metrics.jaccard_correlation_vs_transport_median"] <= 1
    assert "metrics.split_share_a_median" in runs.columns
    assert "metrics.xrecon_aligned_median" in runs.columns
    s = runs[runs["tags.saeuniv.stage"] == "similarity"].iloc[0]
    pipe = compare_pipe(tiny_run, own_store)
    la, lb = pipe.pairs[0]
    key = f"a{la}-b{lb}"
    by_cell = cell_metrics(s.run_id)
    for name in matchers.MATCHERS:
        assert 0 <= by_cell[f"rsa_cal_by_{name}/{key}"] <= 1
    main = runs[runs["tags.saeuniv.stage"] == "main"].iloc[0]
    text = mlflow.artifacts.load_text(f"runs:/{main.run_id}/summary.md")
    assert "## Matchers compared" in text and f"| {key} |" in text
    page = mlflow.artifacts.load_text(f"runs:/{main.run_id}/report.html")
    splits = match.splits(pipe)
    assert ('id="splits"' in page) == bool(splits)
    got = similarity.load(similarity.matcher_entry(pipe, la, lb, "transport"))
    assert by_cell[f"cka_by_transport/{key}"] == pytest.approx(
        got["metrics"]["cka"]["observed"])


def test_bad_match_settings_are_refused_before_work(tiny_run):
    cfg = tiny_run["cfg"]
    for changes, msg in (({"match.basis": "weights"}, "match.basis 'weights' is unknown"),
                         ({"match.stitch": "rigid"}, "match.stitch 'rigid' is unknown"),
                         ({"match.reg": 0.0}, "match.reg .* must be > 0"),
                         ({"match.mass": 1.0}, r"match.mass .* must be in \[0, 1\)"),
                         ({"match.compare": True, "match.stitch_rows": 5000},
                          "match.stitch_rows=5000 exceeds extract.n_tokens=1500")):
        with pytest.raises(ConfigError, match=msg):
            cfg.replace(**changes)
