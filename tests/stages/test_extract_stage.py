"""The upstream of matching on tiny models: the analysis windows, codes that drop pad and
BOS and equal a direct encoding, extraction that resumes from its shards, and the checks
that stop a run before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeuniv import cli
from saeuniv.config import load_config
from saeuniv.core.alignment import valid_positions
from saeuniv.extract import load_codes
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store
from saeuniv.tokens import make_windows

from helpers import runs


def test_codes_drop_pad_and_bos_and_match_a_direct_encoding(tiny_pipe):
    pipe = tiny_pipe
    win = pipe.b.windows
    mask = win.mask
    assert (win.tokens == win.pad_id).any(), "the fixture should contain padded windows"
    assert not mask[:, 0].any() and not mask[win.tokens == win.pad_id].any()
    np.testing.assert_array_equal(mask, valid_positions(win.tokens, win.pad_id, win.bos_id))
    np.testing.assert_array_equal(mask, pipe.a.windows.mask)  # one tokenizer: same rows
    layer = pipe.b.layers[-1]
    codes = load_codes(pipe.b.codes[layer]).toarray()
    assert codes.shape[0] == mask.sum()
    model, sae = pipe.b.model, pipe.b.saes[layer]
    with torch.no_grad():
        _, cache = model.model.run_with_cache(torch.as_tensor(win.tokens, dtype=torch.long))
        acts = cache[f"blocks.{layer}.hook_resid_post"][torch.as_tensor(mask)]
        direct = sae.encode(acts).numpy()
    np.testing.assert_allclose(codes, direct, atol=1e-5)
    # both models keep exactly the same token rows
    assert load_codes(pipe.a.codes[0]).shape[0] == codes.shape[0]


def test_windows_start_with_bos_and_offsets_point_into_text(tiny_pipe):
    tok = tiny_pipe.a.tokenizer
    docs = ["The whale sees the storm.", "Congress builds the fleet in March."]
    win = make_windows(docs, tok, context=8)
    assert (win.tokens[:, 0] == win.bos_id).all()
    for row, d, offs in zip(win.tokens, win.doc, win.offsets):
        for token, (s, e) in zip(row, offs):
            if s >= 0:
                assert tok.decode([int(token)]) == docs[d][s:e]


def test_packed_windows_respect_the_token_cap(tiny_pipe):
    docs = [tiny_pipe.a.context(0), "Congress builds the fleet in March. " * 40]
    win = make_windows(docs * 5, tiny_pipe.a.tokenizer, context=16, n_tokens=45, pack=True)
    assert win.tokens.shape == (3, 16)  # ceil(45 / 15) windows, no more
    assert (win.tokens[:, 0] == win.bos_id).all() and (win.tokens != win.pad_id).all()


def test_interrupted_extraction_resumes_from_its_shards(tiny_run, own_store, monkeypatch):
    import saeuniv.extract as extract

    store = Store(own_store)
    cfg = tiny_run["cfg"].replace(**{"extract.n_tokens": 1200, "extract.shard_windows": 8})
    calls = []
    real = extract.extract_shard

    def dies_on_third(model, saes, windows, lo, hi, *args):
        calls.append(lo)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(model, saes, windows, lo, hi, *args)

    monkeypatch.setattr(extract, "extract_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _ = Pipeline(cfg, store).b.codes
    n_shards = -(-len(Pipeline(cfg, store).b.windows.tokens) // 8)
    assert n_shards > 3
    calls.clear()
    monkeypatch.setattr(extract, "extract_shard", lambda *a: (calls.append(a[3]), real(*a))[1])
    resumed = Pipeline(cfg, store).b.codes
    assert calls == [8 * s for s in range(2, n_shards)]  # the two finished shards are reused
    side = Pipeline(cfg, store).b
    win = side.windows
    res = side.model.residuals(torch.as_tensor(win.tokens, dtype=torch.long), side.layers)
    for layer, entry in resumed.items():
        with torch.no_grad():
            direct = side.saes[layer].encode(res[layer][torch.as_tensor(win.mask)])
        np.testing.assert_allclose(load_codes(entry).toarray(), direct.numpy(), atol=1e-5)
        assert entry.meta["quality"]["n_tokens"] == int(win.mask.sum())
    assert not any(store.partial_path("codes", e.key).exists() for e in resumed.values())


def test_bad_layer_fails_fast_with_a_clear_message(tiny_run, own_tracking, capsys):
    code = cli.main(tiny_run["args"] + ["--set", "layers_b=[0, 7]"])
    assert code == 2
    assert "layer(s) [7] are out of range for 's', which has 3 layers" in capsys.readouterr().err
    frame = runs(own_tracking)
    assert len(frame) == 1 and frame.iloc[0]["status"] == "FAILED"
    assert "out of range" in frame.iloc[0]["tags.saeuniv.error"]


def test_token_budget_larger_than_corpus_is_refused(tmp_path, corpus_dir):
    cfg = load_config("tiny", {"corpus.source": str(corpus_dir), "extract.n_tokens": 10**6})
    with pytest.raises(ValueError, match=r"only \d+ tokens but extract.n_tokens=1000000"):
        Pipeline(cfg, Store(tmp_path)).validate()


def test_an_sae_that_reconstructs_the_analysis_tokens_badly_is_tagged(tiny_pipe, tracking,
                                                                     monkeypatch):
    """The preflight sees 256 tokens; the extract stage's FVU on every analysis token is the
    one that counts, and a bad one is tagged on the run, not only logged."""
    import mlflow

    from saeuniv.stages import extract

    good = {"l0": 8.0, "fvu": 0.2, "dead_fraction": 0.1, "n_tokens": 1500}
    bad = {**good, "fvu": 1.06}
    monkeypatch.setattr(extract, "log_quality",
                        lambda pipe: [("a", 0, good), ("b", 2, bad)])
    mlflow.set_experiment("fvu-warning")
    with mlflow.start_run() as run:
        extract.run(tiny_pipe)
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["saeuniv.warning.fvu_b2"].startswith(
        "SAE b layer 2 reconstructs badly on the 1500 analysis tokens: FVU 1.06 (variance "
        "explained -0.06)")
    assert "saeuniv.warning.fvu_a0" not in tags
