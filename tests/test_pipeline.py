"""The whole pipeline on tiny models: stages, MLflow structure, caching, masking, errors."""

from __future__ import annotations

import json
import os
import time

import mlflow
import numpy as np
import pytest
import torch

from conftest import private_runs
from saeuniv import cli, matching
from saeuniv.alignment import valid_positions
from saeuniv.config import ConfigError, load_config
from saeuniv.extract import load_codes
from saeuniv.pipeline import STAGES, Pipeline, load_matches
from saeuniv.store import Store
from saeuniv.tokens import make_windows
from saeuniv.tracking import git_info


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir):
    """One tiny `saeuniv run` into a private store and MLflow database, then a warm rerun."""
    root = tmp_path_factory.mktemp("run")
    args = ["run", "--config", "tiny", "--set", f"corpus.source={corpus_dir}"]
    with private_runs(root) as uri:
        t0 = time.time()
        assert cli.main(args) == 0
        cold = time.time() - t0
        entries = sorted(p.name for p in (root / "store").rglob("manifest.json"))
        t0 = time.time()
        assert cli.main(args) == 0
        warm = time.time() - t0
        entries_after = sorted(p.name for p in (root / "store").rglob("manifest.json"))
        yield {"root": root, "uri": uri, "cold": cold, "warm": warm,
               "n_entries": (len(entries), len(entries_after)),
               "cfg": load_config("tiny", {"corpus.source": str(corpus_dir)})}


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def test_main_run_has_nested_stage_runs(tiny_run):
    runs = _runs(tiny_run["uri"])
    mains = runs[runs["tags.saeuniv.stage"] == "main"]
    assert len(mains) == 2 and set(mains["status"]) == {"FINISHED"}
    for _, main in mains.iterrows():
        children = runs[runs["tags.mlflow.parentRunId"] == main.run_id]
        assert sorted(children["tags.saeuniv.stage"]) == sorted(STAGES)
        assert set(children["status"]) == {"FINISHED"}
    assert set(runs["status"]) == {"FINISHED"}


def test_main_run_metrics_and_artifacts(tiny_run):
    runs = _runs(tiny_run["uri"])
    main = runs[runs["tags.saeuniv.stage"] == "main"].iloc[0]
    cfg = tiny_run["cfg"]
    la, lb = len(Pipeline(cfg).layers("a")), len(Pipeline(cfg).layers("b"))
    for metric in ("svcca", "rsa"):
        for field in ("", "_null_mean", "_z", "_p"):
            cols = [c for c in runs.columns if c.startswith(f"metrics.{metric}{field}/a")]
            assert len(cols) >= 1, (metric, field)
        p_cols = [c for c in runs.columns if c.startswith(f"metrics.{metric}_p/")]
        for c in p_cols:
            p = main[c]
            if p == p:  # scored pairs: p is a valid permutation p-value, never 0
                assert 1 / (cfg.similarity.n_perm + 1) - 1e-12 <= p <= 1
    assert len([c for c in runs.columns if c.startswith("metrics.n_pairs/")]) == la * lb
    for q in ("sae_l0_a", "sae_fvu_b", "sae_dead_a"):
        assert np.isfinite(main[f"metrics.{q}"])
    history = mlflow.MlflowClient().get_metric_history(main.run_id, "sae_fvu_b")
    assert sorted(m.step for m in history) == list(range(lb))
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(main.run_id)}
    assert {"heatmap_svcca.png", "heatmap_rsa.png", "grids.json", "summary.md",
            "matched_pairs.csv", "config.yaml"} <= arts
    pairs_csv = mlflow.artifacts.load_text(f"runs:/{main.run_id}/matched_pairs.csv")
    header, first = pairs_csv.splitlines()[:2]
    assert header.split(",")[:5] == ["layer_a", "layer_b", "a", "b", "corr"]
    assert "context_a" in header and "[[" in first  # top context shown with its token marked
    grids = mlflow.artifacts.load_dict(f"runs:/{main.run_id}/grids.json")
    assert np.asarray(grids["n_pairs"]).shape == (la, lb)
    models = runs[runs["tags.saeuniv.stage"] == "models"].iloc[0]
    assert models["metrics.param_ratio"] >= 3  # tiny family members differ in size
    assert models["metrics.val_loss_gap"] > 0  # the larger model has the lower val loss


def test_warm_run_reuses_every_artefact(tiny_run):
    before, after = tiny_run["n_entries"]
    assert before == after and before > 10
    assert tiny_run["warm"] < tiny_run["cold"] / 2


def test_codes_drop_pad_and_bos_and_match_a_direct_encoding(tiny_run):
    os.environ["SAEUNIV_HOME"] = str(tiny_run["root"] / "store")
    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    win = pipe.windows("b")
    mask = win.mask
    assert (win.tokens == win.pad_id).any(), "the fixture should contain padded windows"
    assert not mask[:, 0].any() and not mask[win.tokens == win.pad_id].any()
    np.testing.assert_array_equal(mask, valid_positions(win.tokens, win.pad_id, win.bos_id))
    np.testing.assert_array_equal(mask, pipe.windows("a").mask)  # one tokenizer: same rows
    layer = pipe.layers("b")[-1]
    codes = load_codes(pipe.all_codes["b"][layer]).toarray()
    assert codes.shape[0] == mask.sum()
    model, (_, sae) = pipe.model("b"), pipe.sae("b", layer)
    with torch.no_grad():
        _, cache = model.model.run_with_cache(torch.as_tensor(win.tokens, dtype=torch.long))
        acts = cache[f"blocks.{layer}.hook_resid_post"][torch.as_tensor(mask)]
        direct = sae.encode(acts).numpy()
    np.testing.assert_allclose(codes, direct, atol=1e-5)
    # both models keep exactly the same token rows
    assert load_codes(pipe.all_codes["a"][0]).shape[0] == codes.shape[0]


def test_valid_positions_masks_pad_and_leading_bos_only():
    toks = np.array([[0, 5, 6, 1, 1], [0, 0, 7, 8, 9]])
    mask = valid_positions(toks, pad_id=1, bos_id=0)
    assert mask.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]


def test_windows_start_with_bos_and_offsets_point_into_text(tiny_run):
    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    docs = ["The whale sees the storm.", "Congress builds the fleet in March."]
    win = make_windows(docs, pipe.tokenizer("a"), context=8)
    assert (win.tokens[:, 0] == win.bos_id).all()
    for row, d, offs in zip(win.tokens, win.doc, win.offsets):
        for tok, (s, e) in zip(row, offs):
            if s >= 0:
                assert pipe.tokenizer("a").decode([int(tok)]) == docs[d][s:e]


def test_bad_layer_fails_fast_with_a_clear_message(tiny_run, capsys):
    os.environ["MLFLOW_TRACKING_URI"] = tiny_run["uri"]
    os.environ["SAEUNIV_HOME"] = str(tiny_run["root"] / "store")
    n_before = len(_runs(tiny_run["uri"]))
    code = cli.main(["run", "--config", "tiny", "--set",
                     f"corpus.source={tiny_run['cfg'].corpus.source}", "--set", "layers_b=[0, 7]"])
    assert code == 2
    assert "layer(s) [7] are out of range for 's', which has 3 layers" in capsys.readouterr().err
    runs = _runs(tiny_run["uri"])
    assert "RUNNING" not in set(runs["status"])
    failed = runs[runs["status"] == "FAILED"]
    assert len(runs) == n_before + 1 and len(failed) == 1
    assert "out of range" in failed.iloc[0]["tags.saeuniv.error"]


def test_token_budget_larger_than_corpus_is_refused(tmp_path, corpus_dir):
    cfg = load_config("tiny", {"corpus.source": str(corpus_dir), "extract.n_tokens": 10**6})
    with pytest.raises(ValueError, match=r"only \d+ tokens but extract.n_tokens=1000000"):
        Pipeline(cfg, Store(tmp_path)).validate()


def test_disk_plan_counts_what_the_store_lacks(tiny_run, tmp_path):
    store = Store(tiny_run["root"] / "store")
    cfg = tiny_run["cfg"]
    warm = Pipeline(cfg, store).planned_bytes()
    assert warm["models"][0] == warm["saes"][0] == warm["codes"][0] == 0
    assert warm["matches"][0] > 0  # small, always counted
    # another token budget: new windows and codes, the same models and SAEs
    other = Pipeline(cfg.replace(**{"extract.n_tokens": 1000}), store)
    plan = other.planned_bytes("extract")
    assert set(plan) == {"models", "saes", "codes"}
    assert plan["models"][0] == plan["saes"][0] == 0
    rows = other.windows_entry.meta["n_valid_tokens"]
    n_layers = len(other.layers("a")) + len(other.layers("b"))
    l0 = min(cfg.sae.expansion * 16, 128)  # standard SAEs: width 4 x 16, 4 x 32, capped
    per_layer = {16: (8 * l0 + 4) * rows, 32: (8 * min(cfg.sae.expansion * 32, 128) + 4) * rows}
    expected = (per_layer[16] * len(other.layers("a")) + per_layer[32] * len(other.layers("b"))
                + per_layer[32])  # one layer's shards and matrix on disk at once
    assert plan["codes"][0] == expected and f"{n_layers} layer(s)" in plan["codes"][1]
    # an empty store: every model and SAE, close to their real sizes
    fresh = Pipeline(cfg, Store(tmp_path / "store")).planned_bytes()
    pipe = Pipeline(cfg, store)
    weights = sum(4 * e.meta["params"] for e in pipe.model_entries.values())
    assert abs(fresh["models"][0] - weights) < 0.05 * weights
    sae_files = sum(f["size"] for side in "ab" for e in pipe.sae_entries(side).values()
                    for f in e.manifest["files"].values())
    assert abs(fresh["saes"][0] - sae_files) < 0.05 * sae_files


def test_packed_windows_respect_the_token_cap(tiny_run):
    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    docs = [d for d in (pipe.context(0), "Congress builds the fleet in March. " * 40)]
    win = make_windows(docs * 5, pipe.tokenizer("a"), context=16, n_tokens=45, pack=True)
    assert win.tokens.shape == (3, 16)  # ceil(45 / 15) windows, no more
    assert (win.tokens[:, 0] == win.bos_id).all() and (win.tokens != win.pad_id).all()


def test_interrupted_extraction_resumes_from_its_shards(tiny_run, monkeypatch):
    import saeuniv.extract as extract

    store = Store(tiny_run["root"] / "store")
    cfg = tiny_run["cfg"].replace(**{"extract.n_tokens": 1200, "extract.shard_windows": 8})
    calls = []
    real = extract._extract_shard

    def dies_on_third(model, saes, windows, lo, hi, *args):
        calls.append(lo)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(model, saes, windows, lo, hi, *args)

    monkeypatch.setattr(extract, "_extract_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, store).codes("b")
    n_shards = -(-len(Pipeline(cfg, store).windows("b").tokens) // 8)
    assert n_shards > 3
    calls.clear()
    monkeypatch.setattr(extract, "_extract_shard", lambda *a: (calls.append(a[3]), real(*a))[1])
    resumed = Pipeline(cfg, store).codes("b")
    assert calls == [8 * s for s in range(2, n_shards)]  # the two finished shards are reused
    pipe = Pipeline(cfg, store)
    win = pipe.windows("b")
    res = pipe.model("b").residuals(torch.as_tensor(win.tokens, dtype=torch.long),
                                    pipe.layers("b"))
    for layer, entry in resumed.items():
        with torch.no_grad():
            direct = pipe.sae("b", layer)[1].encode(res[layer][torch.as_tensor(win.mask)])
        np.testing.assert_allclose(load_codes(entry).toarray(), direct.numpy(), atol=1e-5)
        assert entry.meta["quality"]["n_tokens"] == int(win.mask.sum())
    assert not any((store.root / "partial" / "codes").glob("*/shard-*"))


def _entries(store, kinds=("corpus", "tokenizer", "windows", "model", "sae", "codes")):
    return {k: len(list((store / k).glob("*/manifest.json"))) for k in kinds}


def test_match_n_tokens_matches_on_a_prefix_of_one_extraction(tiny_run):
    store = tiny_run["root"] / "store"
    cfg = tiny_run["cfg"].replace(**{"match.junk_filter": False, "match.n_tokens": 700})
    before = _entries(store)
    pipe = Pipeline(cfg, Store(store))
    la, lb = pipe.pairs()[-1]
    entry = pipe.matches(la, lb)
    assert _entries(store) == before  # no new codes (nor models, SAEs, windows)
    assert entry.meta["n_tokens"] == 700
    codes_a = load_codes(pipe.all_codes["a"][la])
    codes_b = load_codes(pipe.all_codes["b"][lb])
    assert codes_a.shape[0] >= 1500
    direct = matching.match(matching.correlation(codes_a[:700], codes_b[:700]),
                            policy=cfg.match.policy, threshold=-1.0)
    direct = direct.take(direct.corr > cfg.match.threshold)
    got = load_matches(entry)
    np.testing.assert_array_equal(got.a, direct.a)
    np.testing.assert_array_equal(got.b, direct.b)
    np.testing.assert_allclose(got.corr, direct.corr, rtol=1e-6)
    every_row = load_matches(pipe.with_analysis(cfg.replace(**{"match.n_tokens": 0}))
                             .matches(la, lb))
    assert not np.array_equal(every_row.corr, got.corr)  # the prefix is what was matched
    # the premise: the windows of a smaller budget are a prefix of a larger budget's
    small = Pipeline(tiny_run["cfg"].replace(**{"extract.n_tokens": 700}), Store(store))
    rows = load_codes(small.all_codes["a"][la])
    assert rows.shape[0] >= 700
    np.testing.assert_allclose(rows.toarray(), codes_a[:rows.shape[0]].toarray(), atol=1e-5)
    with pytest.raises(ConfigError, match=r"match.n_tokens=2000 exceeds extract.n_tokens=1500; "
                       r"raise extract.n_tokens"):
        tiny_run["cfg"].replace(**{"match.n_tokens": 2000})


def test_with_analysis_shares_the_artefacts_and_refuses_upstream_changes(tiny_run):
    cfg = tiny_run["cfg"]
    pipe = Pipeline(cfg, Store(tiny_run["root"] / "store"))
    codes = pipe.all_codes
    other = pipe.with_analysis(cfg.replace(**{"match.threshold": 0.3, "similarity.n_perm": 9}))
    assert other.all_codes is codes and other.cfg.match.threshold == 0.3
    with pytest.raises(ValueError, match=r"differs upstream of matching in \['extract'\]"):
        pipe.with_analysis(cfg.replace(**{"extract.n_tokens": 700}))


def test_lineage_tags_are_on_every_run_and_searchable(tiny_run):
    runs = _runs(tiny_run["uri"])
    main = runs[(runs["tags.saeuniv.stage"] == "main") & (runs.status == "FINISHED")].iloc[0]
    corpus_hash = main["tags.saeuniv.corpus_hash"]
    assert len(corpus_hash) == 64
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string=f"tags.saeuniv.corpus_hash = '{corpus_hash}'")
    mine = found[(found.run_id == main.run_id) | (found["tags.mlflow.parentRunId"] == main.run_id)]
    assert sorted(mine["tags.saeuniv.stage"]) == sorted(("main",) + STAGES)
    cfg = tiny_run["cfg"]
    pipe = Pipeline(cfg, Store(tiny_run["root"] / "store"))
    expected = {"saeuniv.config_hash": cfg.hash(), "saeuniv.seed.corpus": str(cfg.corpus.seed),
                "saeuniv.seed.family": str(cfg.family.seed),
                "saeuniv.seed.sae": str(cfg.sae.seed),
                "saeuniv.seed.similarity": str(cfg.similarity.seed),
                "saeuniv.seed.subspaces": str(cfg.subspaces.seed),
                "saeuniv.n_tokens": str(pipe.windows_entry.meta["n_valid_tokens"]),
                "saeuniv.model_a.key": pipe.model_key("a"),
                "saeuniv.model_b.key": pipe.model_key("b"),
                "saeuniv.sae.a0": pipe.sae_key("a", 0),
                f"saeuniv.sae.b{pipe.layers('b')[-1]}": pipe.sae_key("b", pipe.layers("b")[-1])}
    for _, run in mine.iterrows():  # every key on every run that resolved it, the same value
        for tag, value in expected.items():
            if run["tags.saeuniv.stage"] == "models" and tag.startswith("saeuniv.sae."):
                assert run[f"tags.{tag}"] != run[f"tags.{tag}"]  # SAEs are not trained to tag
            else:
                assert run[f"tags.{tag}"] == value, (run["tags.saeuniv.stage"], tag)
        for lib in ("torch", "mlflow", "sae_lens", "transformer_lens", "optuna", "numpy"):
            assert run[f"tags.saeuniv.{lib}"] not in (None, "", "unknown"), lib
        assert run["tags.saeuniv.version"] and len(run["tags.saeuniv.code_version"]) == 64
        if git_info():  # a git checkout (not, e.g., an unpacked source archive)
            assert run["tags.saeuniv.git_dirty"] in ("true", "false")
    by_key = mlflow.search_runs(search_all_experiments=True, filter_string=(
        f"tags.saeuniv.model_b.key = '{pipe.model_key('b')}' and tags.saeuniv.stage = 'main'"))
    assert main.run_id in set(by_key.run_id)


def _finished(runs, stage):
    return runs[(runs["tags.saeuniv.stage"] == stage) & (runs.status == "FINISHED")]


def _artifact_dir(run_id) -> "Path":
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    uri = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def test_audit_prints_provenance_and_finds_the_artifacts_intact(tiny_run, capsys):
    from saeuniv.tracking import sha256_file

    os.environ["MLFLOW_TRACKING_URI"] = tiny_run["uri"]
    runs = _runs(tiny_run["uri"])
    main = _finished(runs, "main").iloc[0]
    assert cli.main(["audit", main.run_id]) == 0
    out = capsys.readouterr().out
    assert "audit: intact: 0 problem(s)" in out
    assert f"saeuniv.corpus_hash = {main['tags.saeuniv.corpus_hash']}" in out
    assert "match.threshold = " in out and "none (a top-level run)" in out
    children = out.split("## children")[1].split("## artifacts")[0]
    assert sorted(l.split()[2] for l in children.strip().splitlines()) == sorted(STAGES)
    assert children.count("FINISHED") == len(STAGES)
    heatmap = _artifact_dir(main.run_id) / "heatmap_svcca.png"
    assert f"heatmap_svcca.png  {heatmap.stat().st_size:>10}  {sha256_file(heatmap)}  ok" in out
    child = _finished(runs, "match")
    child = child[child["tags.mlflow.parentRunId"] == main.run_id].iloc[0]
    assert cli.main(["audit", child.run_id]) == 0
    assert main.run_id in capsys.readouterr().out.split("## parent")[1].split("## children")[0]
    assert cli.main(["audit", "0" * 32]) == 2
    assert "not found" in capsys.readouterr().err


def test_audit_fails_naming_a_changed_or_missing_artifact(tiny_run, capsys):
    os.environ["MLFLOW_TRACKING_URI"] = tiny_run["uri"]
    run_id = _finished(_runs(tiny_run["uri"]), "match").iloc[0].run_id
    path = _artifact_dir(run_id) / "top_pairs.json"
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b"0", b"1", 1))
        assert cli.main(["audit", run_id]) == 1
        out = capsys.readouterr().out
        assert "CHANGED top_pairs.json: sha256 " in out and "NOT intact: 1 problem(s)" in out
        path.unlink()
        assert cli.main(["audit", run_id]) == 1
        assert "\nMISSING top_pairs.json\n" in capsys.readouterr().out
    finally:
        path.write_bytes(original)
    assert cli.main(["audit", run_id]) == 0


def test_compare_lines_up_two_main_runs(tiny_run, tmp_path, monkeypatch, capsys):
    """Two main runs differing in match.threshold (warm store, own MLflow database)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SAEUNIV_HOME", str(tiny_run["root"] / "store"))
    base = ["run", "--config", "tiny", "--set", f"corpus.source={tiny_run['cfg'].corpus.source}"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--threshold", "0.3"]) == 0
    capsys.readouterr()
    runs = _finished(_runs(f"sqlite:///{tmp_path / 'mlflow.db'}"), "main")
    ids = list(runs.sort_values("start_time").run_id)
    assert cli.main(["compare", f"{ids[0]},{ids[1]}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["param", ids[0][:12], ids[1][:12]]
    t0 = str(tiny_run["cfg"].match.threshold)
    assert out.splitlines()[2].split() == ["match.threshold", t0, "0.3"]
    client = mlflow.MlflowClient()
    comp = mlflow.search_runs(filter_string="tags.saeuniv.stage = 'compare'",
                              search_all_experiments=True)
    assert len(comp) == 1 and comp.iloc[0]["tags.saeuniv.compared"] == f"{ids[0]},{ids[1]}"
    arts = {a.path for a in client.list_artifacts(comp.iloc[0].run_id)}
    assert {"compare_depth_curves.png", "diff_heatmap_svcca.png", "diff_heatmap_rsa.png",
            "params_diff.csv", "artifacts.sha256.json"} <= arts
    table = mlflow.artifacts.load_text(f"runs:/{comp.iloc[0].run_id}/params_diff.csv")
    assert table.splitlines() == [f"param,{ids[0]},{ids[1]}", f"match.threshold,{t0},0.3"]
    # the curve is the runs' per-layer svcca metric against relative depth
    from saeuniv.compare import depth_curve, diff_grid, load_run

    r0, r1 = load_run(client, ids[0]), load_run(client, ids[1])
    x, y = depth_curve(r0, "svcca")
    cfg = tiny_run["cfg"]
    pipe = Pipeline(cfg, Store(tiny_run["root"] / "store"))
    assert list(x) == [pipe.relative_depth("a", la) for la in pipe.layers("a")]
    hist = {m.step: m.value for m in client.get_metric_history(ids[0], "svcca")}
    np.testing.assert_allclose([hist.get(la, np.nan) for la in pipe.layers("a")], y)
    assert r0["n_layers"] == {side: pipe.info(side).n_layers for side in "ab"}
    d = diff_grid(r0, r1, "rsa")
    np.testing.assert_allclose(d, np.asarray(r1["grids"]["metrics"]["rsa"]["observed"], float)
                               - np.asarray(r0["grids"]["metrics"]["rsa"]["observed"], float))
    # different layer grids: a clear error, no compare run
    assert cli.main(base + ["--set", "layers_b=[0, 2]"]) == 0
    other = _finished(_runs(f"sqlite:///{tmp_path / 'mlflow.db'}"), "main")
    third = (set(other.run_id) - set(ids)).pop()
    capsys.readouterr()
    assert cli.main(["compare", ids[0], third]) == 2
    assert "needs one layer grid" in capsys.readouterr().err
    assert cli.main(["compare", ids[0]]) == 2
    assert "at least two run ids" in capsys.readouterr().err
    assert cli.main(["compare", ids[0], comp.iloc[0].run_id]) == 2
    assert "compare takes main runs" in capsys.readouterr().err
    assert len(mlflow.search_runs(filter_string="tags.saeuniv.stage = 'compare'",
                                  search_all_experiments=True)) == 1


def test_main_run_logs_a_self_contained_html_report(tiny_run):
    runs = _runs(tiny_run["uri"])
    main = _finished(runs, "main").iloc[0]
    html = mlflow.artifacts.load_text(f"runs:/{main.run_id}/report.html")
    for section in ('id="summary"', 'id="heatmaps"', 'id="curves"', 'id="quality"',
                    'id="pairs"'):
        assert section in html
    cfg = tiny_run["cfg"]
    assert html.count("data:image/png;base64,") == len(cfg.similarity.metrics) + 1
    assert "src=\"http" not in html and "<script" not in html  # nothing fetched, nothing run
    pipe = Pipeline(cfg, Store(tiny_run["root"] / "store"))
    q = pipe.all_codes["b"][pipe.layers("b")[-1]].meta["quality"]
    assert f'<td class="num">{float(q["fvu"]):.4g}</td>' in html
    assert "[[" in html and "sae_dead" in html and "top_tokens_a" in html


def test_html_report_escapes_text_from_the_data():
    from saeuniv.htmlreport import render

    pair = {"layer_a": 0, "layer_b": 1, "a": 3, "b": 4, "corr": 0.5,
            "top_tokens_a": "'<b>'", "top_tokens_b": "'&'",
            "context_a": "x <script>alert(1)</script> [[y]]", "context_b": '"q"'}
    html = render("A <i> vs B", "# s & t", {"svcca": "AAAA"}, "BBBB",
                  [("a", 0, {"l0": 3.0, "fvu": 0.25, "dead_fraction": 0.0})], [pair])
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; [[y]]" in html
    assert "&#x27;&lt;b&gt;&#x27;" in html and "&#x27;&amp;&#x27;" in html
    assert "A &lt;i&gt; vs B" in html and "# s &amp; t" in html
    assert 'src="data:image/png;base64,AAAA"' in html and "&quot;q&quot;" in html
    assert '<td class="num">0.25</td>' in html


def test_warm_run_reuses_the_finished_stage_runs(tiny_run, capsys):
    os.environ["MLFLOW_TRACKING_URI"] = tiny_run["uri"]
    runs = _runs(tiny_run["uri"])
    first, second = _finished(runs, "main").sort_values("start_time").run_id[:2]
    kids = lambda main: runs[runs["tags.mlflow.parentRunId"] == main].set_index(
        "tags.saeuniv.stage")
    cold, warm = kids(first), kids(second)
    for stage in STAGES:
        assert cold.loc[stage, "tags.saeuniv.reused_from"] != cold.loc[stage,
                                                                        "tags.saeuniv.reused_from"]
        assert warm.loc[stage, "tags.saeuniv.reused_from"] == cold.loc[stage, "run_id"]
        assert warm.loc[stage, "tags.saeuniv.inputs_hash"] == cold.loc[stage,
                                                                       "tags.saeuniv.inputs_hash"]
        metrics = [c for c in runs.columns if c.startswith("metrics.")
                   and cold.loc[stage, c] == cold.loc[stage, c]]
        assert metrics and all(warm.loc[stage, c] == cold.loc[stage, c] for c in metrics)
        assert cli.main(["audit", warm.loc[stage, "run_id"]]) == 0
    client = mlflow.MlflowClient()
    hist = lambda run, key: [(m.step, m.value) for m in client.get_metric_history(run, key)]
    assert hist(warm.loc["extract", "run_id"], "sae_fvu_b") == hist(cold.loc["extract", "run_id"],
                                                                    "sae_fvu_b")
    arts = {a.path for a in client.list_artifacts(warm.loc["match", "run_id"])}
    assert {"top_pairs.json", "artifacts.sha256.json"} <= arts


def test_changed_artifacts_are_not_reused_and_force_recomputes(tiny_run, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = tiny_run["root"] / "store"
    monkeypatch.setenv("SAEUNIV_HOME", str(store))
    args = ["match", "--config", "tiny", "--set", f"corpus.source={tiny_run['cfg'].corpus.source}"]

    def latest():
        runs = _runs(uri).sort_values("start_time")
        return runs.iloc[-1]

    assert cli.main(args) == 0
    r1 = latest()
    reused = lambda row: row.get("tags.saeuniv.reused_from") \
        if isinstance(row.get("tags.saeuniv.reused_from"), str) else None
    assert reused(r1) is None  # computed
    assert cli.main(args) == 0
    r2 = latest()
    assert reused(r2) == r1.run_id
    changed = _artifact_dir(r2.run_id) / "top_pairs.json"
    changed.write_text(changed.read_text() + " ")
    assert cli.main(args) == 0  # r2's copy no longer matches its checksum: not trusted
    r3 = latest()
    assert reused(r3) == r1.run_id
    created = lambda kind: sorted(json.loads(p.read_text())["created"]
                                  for p in (store / kind).glob("*/manifest.json"))
    matches, scores = created("matches"), created("scores")
    assert cli.main(args + ["--force"]) == 0
    r4 = latest()
    assert reused(r4) is None
    assert r4["tags.saeuniv.stage"] == "match" and r4.status == "FINISHED"
    n = len(Pipeline(tiny_run["cfg"]).pairs())
    rebuilt = [t for t in created("matches") if t > r3.end_time.timestamp()]
    assert len(rebuilt) == n and len(created("matches")) == len(matches)  # overwritten
    assert created("scores") == scores  # other stages' entries untouched


# -- semantic subspaces -----------------------------------------------------------

def _subspace_runs(tiny_run):
    runs = _runs(tiny_run["uri"])
    stage = runs[(runs["tags.saeuniv.stage"] == "subspaces")
                 & runs["tags.saeuniv.reused_from"].isna()].iloc[0]
    return stage, runs[runs["tags.mlflow.parentRunId"] == stage.run_id]


def test_subspaces_stage_logs_a_nested_run_per_layer_pair(tiny_run):
    import csv
    import io

    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    stage, pairs = _subspace_runs(tiny_run)
    assert stage["status"] == "FINISHED" and set(pairs["status"]) == {"FINISHED"}
    assert sorted(zip(pairs["params.layer_a"].astype(int), pairs["params.layer_b"].astype(int))) \
        == sorted(pipe.subspace_pairs())
    client = mlflow.MlflowClient()
    for _, run in pairs.iterrows():
        assert {"categories.png", "categories.json", "labelled_features.csv"} <= {
            a.path for a in client.list_artifacts(run.run_id)}
    table = list(csv.DictReader(io.StringIO(
        mlflow.artifacts.load_text(f"runs:/{stage.run_id}/subspaces.csv"))))
    cats = list(pipe.concepts.categories)
    assert {r["category"] for r in table} == set(cats) and len(cats) == 8
    for r in table:
        if r["status"].startswith("too few pairs"):  # reported, never scored
            assert int(r["n_pairs"]) < pipe.cfg.subspaces.min_pairs and r["observed"] == ""
        elif r["status"] == "ok":
            n = pipe.cfg.subspaces.n_perm
            for null in ("shuffle", "random"):
                assert 1 / (n + 1) - 1e-12 <= float(r[f"{null}_p"]) <= 1
                assert float(r[f"{null}_p"]) <= float(r[f"{null}_q"]) <= 1
    assert any(r["status"] == "ok" for r in table)
    summary = mlflow.artifacts.load_text(f"runs:/{stage.run_id}/subspaces_summary.md")
    assert all(c in summary for c in cats)
    main_id = stage["tags.mlflow.parentRunId"]
    main_summary = mlflow.artifacts.load_text(f"runs:/{main_id}/summary.md")
    n_scored = sum(r["metric"] == "rsa" and r["observed"] != "" for r in table)
    assert f"- rsa: {sum(r['significant'] == 'True' for r in table if r['metric'] == 'rsa')} " \
        f"of {n_scored} scored" in main_summary
    # the labelled features: multi-word phrases hit, with the top contexts marked
    labelled = [row for _, run in pairs.iterrows() for row in csv.DictReader(io.StringIO(
        mlflow.artifacts.load_text(f"runs:/{run.run_id}/labelled_features.csv")))]
    multi = [r for r in labelled if r["multi_word"] == "True"]
    assert multi and all(int(r["phrase_tokens"]) > 1 for r in multi)
    assert {r["phrase"] for r in multi} & {"New York", "United States", "last week"}
    assert all("[[" in r["top_contexts"] and 1 <= int(r["hits"]) <= int(r["top_k"])
               for r in labelled)


def test_a_known_phrase_feature_is_labelled_through_the_pipeline_spans(tiny_run):
    """Codes where one feature fires only inside "New York" (the tiny corpus has it), on
    the pipeline's own windows, token offsets and document spans: labelling finds it."""
    import scipy.sparse as sp

    from saeuniv import subspaces
    from saeuniv.corpus import read_split

    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    win, pos = pipe.windows("a"), pipe.positions("a")
    docs = [d["text"] for d in read_split(pipe.corpus, "analysis")]
    inside = np.zeros(len(pos), bool)  # rows whose token lies in an occurrence, found by str.find
    for row, (w, p) in enumerate(pos):
        text, (s, e) = docs[win.doc[w]], win.offsets[w, p]
        start = text.find("New York", max(0, s - 8))
        inside[row] = start >= 0 and start <= s and e <= start + len("New York") and e > s
    assert inside.sum() >= 5
    first = inside & ~np.roll(inside, 1)  # the first token of each occurrence
    rows = np.flatnonzero(inside & ~first) if (inside & ~first).sum() >= 5 else \
        np.flatnonzero(inside)  # fire on "York" (inside the phrase), not on "New"
    codes = np.zeros((len(pos), 4))
    codes[rows, 2] = np.linspace(2, 1, rows.size)
    codes[np.flatnonzero(~inside)[::7], 0] = 1.0  # elsewhere
    top = matching.top_activations(sp.csr_array(codes), 5)
    lab = subspaces.label_features(top.rows, pipe.row_spans("a"), pipe.occurrences)
    c = pipe.concepts.categories.index("countries")
    assert lab.hits[2, c] == 5 and pipe.concepts.phrases[c][lab.phrase[2, c]] == "New York"
    assert c not in np.flatnonzero(lab.member[3])  # never fires: no label


def test_shuffled_labels_in_the_pipeline_score_nothing_significant(tiny_run, tmp_path,
                                                                   monkeypatch):
    from saeuniv import pipeline as pl

    pipe = Pipeline(tiny_run["cfg"], Store(tiny_run["root"] / "store"))
    real = pl.load_labels
    rng = np.random.default_rng(0)

    def shuffled(entry, min_hits):
        lab, top = real(entry, min_hits)
        perm = rng.permutation(lab.hits.shape[0])
        return pl.subspaces.Labels(lab.hits[perm], lab.phrase[perm], lab.member[perm],
                                   lab.top_k), top

    monkeypatch.setattr(pl, "load_labels", shuffled)
    results = []
    for la, lb in pipe.subspace_pairs():
        out = tmp_path / f"{la}-{lb}"
        out.mkdir()
        pl._build_subspaces(pipe, la, lb, pipe.labels("a", la), pipe.labels("b", lb),
                            pipe.matches(la, lb), out)
        results.append(json.loads((out / "subspaces.json").read_text()))
    table = pl.subspace_table(results)
    assert any(r["observed"] is not None for r in table)
    assert not any(r["significant"] for r in table)


def test_a_missing_concept_set_fails_before_any_run(tiny_run, capsys):
    os.environ["MLFLOW_TRACKING_URI"] = tiny_run["uri"]
    n_before = len(_runs(tiny_run["uri"]))
    code = cli.main(["subspaces", "--config", "tiny", "--set",
                     f"corpus.source={tiny_run['cfg'].corpus.source}", "--set",
                     "subspaces.concepts=nowhere/mine.yaml"])
    assert code == 2
    assert "subspaces.concepts='nowhere/mine.yaml' names no concept-set file" in \
        capsys.readouterr().err
    assert len(_runs(tiny_run["uri"])) == n_before
