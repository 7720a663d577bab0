"""The whole pipeline on tiny models: the main run and its nested stage runs, what they log,
lineage, the report, run reuse and --force."""

from __future__ import annotations

import json

import mlflow
import numpy as np

from saeuniv import cli, stages
from saeuniv.cells import cell_metrics
from saeuniv.tracking import git_info

from helpers import artifact_dir, finished, runs


def test_main_run_has_nested_stage_runs(tiny_run):
    frame = runs(tiny_run["uri"])
    mains = frame[frame["tags.saeuniv.stage"] == "main"]
    assert len(mains) == 2 and set(mains["status"]) == {"FINISHED"}
    for _, main in mains.iterrows():
        children = frame[frame["tags.mlflow.parentRunId"] == main.run_id]
        assert sorted(children["tags.saeuniv.stage"]) == sorted(stages.NAMES)
        assert set(children["status"]) == {"FINISHED"}
    assert set(frame["status"]) == {"FINISHED"}


def test_runs_go_to_the_config_experiment_named_by_what_differs(tiny_run):
    frame = runs(tiny_run["uri"])
    client = mlflow.MlflowClient(tiny_run["uri"])
    [exp_id] = set(frame.experiment_id)
    exp = client.get_experiment(exp_id)
    # the config's name; opened by the UI on its runs table, not the GenAI overview
    assert exp.name == "saeuniv/tiny"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    label = "xs vs s · one_to_one @ 0.05"
    for _, run in frame[frame["tags.saeuniv.stage"].isin(stages.NAMES)].iterrows():
        assert run["tags.mlflow.runName"] == f"{run['tags.saeuniv.stage']} · {label}"
    assert set(frame[frame["tags.saeuniv.stage"] == "main"]["tags.mlflow.runName"]) == {label}


def test_run_names_tell_settings_apart():
    from saeuniv.config import load_config

    cfg = load_config("default")
    names = {cfg.label(), cfg.replace(**{"match.threshold": 0.2}).label(),
             cfg.replace(**{"match.policy": "hungarian"}).label(),
             cfg.replace(**{"match.basis": "decoder"}).label(),
             cfg.replace(**{"model_b.init": "random"}).label()}
    assert len(names) == 5
    assert cfg.label() == "tiny-s vs tiny-l · one_to_one @ 0.1"


def test_an_experiment_keeps_a_kind_it_already_has(tracking, monkeypatch):
    from saeuniv.tracking import setup_tracking

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = mlflow.MlflowClient(tracking)
    own = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    setup_tracking("mine")
    assert client.get_experiment(own).tags["mlflow.experimentKind"] == "genai_development"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    setup_tracking(None, "unused")
    exp = client.get_experiment_by_name("from-env")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name("unused") is None


def test_main_run_metrics_and_artifacts(tiny_run, tiny_pipe):
    frame = runs(tiny_run["uri"])
    main = frame[frame["tags.saeuniv.stage"] == "main"].iloc[0]
    cfg = tiny_run["cfg"]
    la, lb = len(tiny_pipe.a.layers), len(tiny_pipe.b.layers)
    cells = cell_metrics(main.run_id)  # each layer pair's numbers, from the run's tables
    for metric in ("svcca", "rsa"):
        for field in ("", "_null_mean", "_z", "_p"):
            keys = [k for k in cells if k.startswith(f"{metric}{field}/a")]
            assert len(keys) >= 1, (metric, field)
        for key in (k for k in cells if k.startswith(f"{metric}_p/")):
            # scored pairs: p is a valid permutation p-value, never 0
            assert 1 / (cfg.similarity.n_perm + 1) - 1e-12 <= cells[key] <= 1
    assert len([k for k in cells if k.startswith("n_pairs/")]) == la * lb
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
    models = frame[frame["tags.saeuniv.stage"] == "models"].iloc[0]
    assert models["metrics.param_ratio"] >= 3  # tiny family members differ in size
    assert models["metrics.val_loss_gap"] > 0  # the larger model has the lower val loss


def test_warm_run_reuses_every_artefact(tiny_run):
    before, after = tiny_run["n_entries"]
    assert before == after and before > 10
    assert tiny_run["warm"] < tiny_run["cold"] / 2


def test_lineage_tags_are_on_every_run_and_searchable(tiny_run, tiny_pipe):
    frame = runs(tiny_run["uri"])
    main = finished(frame, "main").iloc[0]
    corpus_hash = main["tags.saeuniv.corpus_hash"]
    assert len(corpus_hash) == 64
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string=f"tags.saeuniv.corpus_hash = '{corpus_hash}'")
    mine = found[(found.run_id == main.run_id) | (found["tags.mlflow.parentRunId"] == main.run_id)]
    assert sorted(mine["tags.saeuniv.stage"]) == sorted(("main",) + stages.NAMES)
    cfg, pipe = tiny_run["cfg"], tiny_pipe
    last_b = pipe.b.layers[-1]
    expected = {"saeuniv.config_hash": cfg.hash(), "saeuniv.seed.corpus": str(cfg.corpus.seed),
                "saeuniv.seed.family": str(cfg.family.seed),
                "saeuniv.seed.sae": str(cfg.sae.seed),
                "saeuniv.seed.similarity": str(cfg.similarity.seed),
                "saeuniv.seed.subspaces": str(cfg.subspaces.seed),
                "saeuniv.n_tokens": str(pipe.up.windows_entry.meta["n_valid_tokens"]),
                "saeuniv.model_a.key": pipe.a.model_key,
                "saeuniv.model_b.key": pipe.b.model_key,
                "saeuniv.sae.a0": pipe.a.sae_keys[0],
                f"saeuniv.sae.b{last_b}": pipe.b.sae_keys[last_b]}
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
        f"tags.saeuniv.model_b.key = '{pipe.b.model_key}' and tags.saeuniv.stage = 'main'"))
    assert main.run_id in set(by_key.run_id)


def test_main_run_logs_a_self_contained_html_report(tiny_run, tiny_pipe):
    main = finished(runs(tiny_run["uri"]), "main").iloc[0]
    html = mlflow.artifacts.load_text(f"runs:/{main.run_id}/report.html")
    for section in ('id="summary"', 'id="heatmaps"', 'id="curves"', 'id="quality"',
                    'id="pairs"'):
        assert section in html
    # per metric: raw, calibrated and convergence-index heatmaps; then the curves
    assert html.count("data:image/png;base64,") == 3 * len(tiny_run["cfg"].similarity.metrics) + 1
    assert "src=\"http" not in html and "<script src" not in html  # nothing fetched
    assert 'id="pair-browser"' in html and "<mark>" in html and "<h4>Calibrated: " in html
    q = tiny_pipe.b.codes[tiny_pipe.b.layers[-1]].meta["quality"]
    assert f'<td class="num">{float(q["fvu"]):.4g}</td>' in html
    assert "[[" not in html and "sae_dead" in html and "top_tokens_a" in html  # marked


def test_warm_run_reuses_the_finished_stage_runs(tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["uri"])
    frame = runs(tiny_run["uri"])
    first, second = finished(frame, "main").sort_values("start_time").run_id[:2]

    def kids(main):
        return frame[frame["tags.mlflow.parentRunId"] == main].set_index("tags.saeuniv.stage")

    cold, warm = kids(first), kids(second)
    for stage in stages.NAMES:
        assert cold.loc[stage, "tags.saeuniv.reused_from"] != cold.loc[stage,
                                                                        "tags.saeuniv.reused_from"]
        assert warm.loc[stage, "tags.saeuniv.reused_from"] == cold.loc[stage, "run_id"]
        assert warm.loc[stage, "tags.saeuniv.inputs_hash"] == cold.loc[stage,
                                                                       "tags.saeuniv.inputs_hash"]
        metrics = [c for c in frame.columns if c.startswith("metrics.")
                   and cold.loc[stage, c] == cold.loc[stage, c]]
        assert all(warm.loc[stage, c] == cold.loc[stage, c] for c in metrics)
        tables = cell_metrics(cold.loc[stage, "run_id"])  # copied with the artefacts
        assert tables == cell_metrics(warm.loc[stage, "run_id"])
        assert metrics or tables, stage
        assert cli.main(["audit", warm.loc[stage, "run_id"]]) == 0
    client = mlflow.MlflowClient()

    def hist(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run, key)]

    assert hist(warm.loc["extract", "run_id"], "sae_fvu_b") == hist(cold.loc["extract", "run_id"],
                                                                    "sae_fvu_b")
    arts = {a.path for a in client.list_artifacts(warm.loc["match", "run_id"])}
    assert {"top_pairs.json", "artifacts.sha256.json"} <= arts


def test_changed_artifacts_are_not_reused_and_force_recomputes(tiny_run, tiny_pipe,
                                                               own_tracking, own_store):
    args = ["match", "--config", "tiny", "--set", f"corpus.source={tiny_run['cfg'].corpus.source}"]

    def latest():
        return runs(own_tracking).sort_values("start_time").iloc[-1]

    def reused(row):
        value = row.get("tags.saeuniv.reused_from")
        return value if isinstance(value, str) else None

    assert cli.main(args) == 0
    r1 = latest()
    assert reused(r1) is None  # computed
    assert cli.main(args) == 0
    r2 = latest()
    assert reused(r2) == r1.run_id
    changed = artifact_dir(r2.run_id) / "top_pairs.json"
    changed.write_text(changed.read_text() + " ")
    assert cli.main(args) == 0  # r2's copy no longer matches its checksum: not trusted
    r3 = latest()
    assert reused(r3) == r1.run_id

    def created(kind):
        return sorted(json.loads(p.read_text())["created"]
                      for p in (own_store / kind).glob("*/manifest.json"))

    matches, scores = created("matches"), created("scores")
    assert cli.main(args + ["--force"]) == 0
    r4 = latest()
    assert reused(r4) is None
    assert r4["tags.saeuniv.stage"] == "match" and r4.status == "FINISHED"
    rebuilt = [t for t in created("matches") if t > r3.end_time.timestamp()]
    assert len(rebuilt) == len(tiny_pipe.pairs) and len(created("matches")) == len(matches)
    assert created("scores") == scores  # other stages' entries untouched
