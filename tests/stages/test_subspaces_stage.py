"""The subspaces stage on tiny models: a nested run per layer pair, labels through the
pipeline's own character spans, and no significance from shuffled labels."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import numpy as np
import scipy.sparse as sp

from saeuniv import cli
from saeuniv.core import matching
from saeuniv.core import subspaces as core
from saeuniv.corpus import read_split
from saeuniv.stages import match
from saeuniv.stages import subspaces as stage

from helpers import runs


def _subspace_runs(tiny_run):
    frame = runs(tiny_run["uri"])
    run = frame[(frame["tags.saeuniv.stage"] == "subspaces")
                & frame["tags.saeuniv.reused_from"].isna()].iloc[0]
    return run, frame[frame["tags.mlflow.parentRunId"] == run.run_id]


def _check_table(pipe, table):
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


def test_subspaces_stage_logs_a_nested_run_per_layer_pair(tiny_run, tiny_pipe):
    pipe = tiny_pipe
    run, pairs = _subspace_runs(tiny_run)
    assert run["status"] == "FINISHED" and set(pairs["status"]) == {"FINISHED"}
    assert sorted(zip(pairs["params.layer_a"].astype(int), pairs["params.layer_b"].astype(int))) \
        == sorted(pipe.subspace_pairs)
    client = mlflow.MlflowClient()
    for _, pair in pairs.iterrows():
        assert {"categories.png", "categories.json", "labelled_features.csv"} <= {
            a.path for a in client.list_artifacts(pair.run_id)}
    table = list(csv.DictReader(io.StringIO(
        mlflow.artifacts.load_text(f"runs:/{run.run_id}/subspaces.csv"))))
    _check_table(pipe, table)
    summary = mlflow.artifacts.load_text(f"runs:/{run.run_id}/subspaces_summary.md")
    assert all(c in summary for c in pipe.concepts.categories)
    main_summary = mlflow.artifacts.load_text(
        f"runs:/{run['tags.mlflow.parentRunId']}/summary.md")
    n_scored = sum(r["metric"] == "rsa" and r["observed"] != "" for r in table)
    assert f"- rsa: {sum(r['significant'] == 'True' for r in table if r['metric'] == 'rsa')} " \
        f"of {n_scored} scored" in main_summary
    # the labelled features: multi-word phrases hit, with the top contexts marked
    labelled = [row for _, pair in pairs.iterrows() for row in csv.DictReader(io.StringIO(
        mlflow.artifacts.load_text(f"runs:/{pair.run_id}/labelled_features.csv")))]
    multi = [r for r in labelled if r["multi_word"] == "True"]
    assert multi and all(int(r["phrase_tokens"]) > 1 for r in multi)
    assert {r["phrase"] for r in multi} & {"New York", "United States", "last week"}
    assert all("[[" in r["top_contexts"] and 1 <= int(r["hits"]) <= int(r["top_k"])
               for r in labelled)


def test_a_known_phrase_feature_is_labelled_through_the_pipeline_spans(tiny_pipe):
    """Codes where one feature fires only inside "New York" (the tiny corpus has it), on
    the pipeline's own windows, token offsets and document spans: labelling finds it."""
    pipe = tiny_pipe
    win, pos = pipe.a.windows, pipe.a.positions
    docs = [d["text"] for d in read_split(pipe.up.corpus, "analysis")]
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
    lab = core.label_features(top.rows, pipe.row_spans["a"], pipe.occurrences)
    c = pipe.concepts.categories.index("countries")
    assert lab.hits[2, c] == 5 and pipe.concepts.phrases[c][lab.phrase[2, c]] == "New York"
    assert c not in np.flatnonzero(lab.member[3])  # never fires: no label


def test_shuffled_labels_in_the_pipeline_score_nothing_significant(tiny_pipe, tmp_path,
                                                                   monkeypatch):
    pipe = tiny_pipe
    real = stage.load_labels
    rng = np.random.default_rng(0)

    def shuffled(entry, min_hits):
        lab, top = real(entry, min_hits)
        perm = rng.permutation(lab.hits.shape[0])
        return core.Labels(lab.hits[perm], lab.phrase[perm], lab.member[perm], lab.top_k), top

    monkeypatch.setattr(stage, "load_labels", shuffled)
    results = []
    for la, lb in pipe.subspace_pairs:
        out = tmp_path / f"{la}-{lb}"
        out.mkdir()
        stage.build(pipe, la, lb, stage.labels_entry(pipe, pipe.a, la),
                    stage.labels_entry(pipe, pipe.b, lb), match.entry(pipe, la, lb), out)
        results.append(json.loads((out / "subspaces.json").read_text()))
    table = stage.table(results)
    assert any(r["observed"] is not None for r in table)
    assert not any(r["significant"] for r in table)


def test_a_missing_concept_set_fails_before_any_run(tiny_run, own_tracking, capsys):
    code = cli.main(["subspaces", *tiny_run["args"][1:], "--set",
                     "subspaces.concepts=nowhere/mine.yaml"])
    assert code == 2
    assert "subspaces.concepts='nowhere/mine.yaml' names no concept-set file" in \
        capsys.readouterr().err
    assert len(runs(own_tracking)) == 0
