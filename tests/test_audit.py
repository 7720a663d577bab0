"""``saeuniv audit``: a run's provenance, and whether its artefacts are intact."""

from __future__ import annotations

from saeuniv import cli, stages
from saeuniv.files import sha256_file

from helpers import artifact_dir, finished, runs


def test_audit_prints_provenance_and_finds_the_artifacts_intact(tiny_run, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["uri"])
    frame = runs(tiny_run["uri"])
    main = finished(frame, "main").iloc[0]
    assert cli.main(["audit", main.run_id]) == 0
    out = capsys.readouterr().out
    assert "audit: intact: 0 problem(s)" in out
    assert f"saeuniv.corpus_hash = {main['tags.saeuniv.corpus_hash']}" in out
    assert "match.threshold = " in out and "none (a top-level run)" in out
    children = out.split("## children")[1].split("## artifacts")[0]
    assert sorted(line.split()[2] for line in children.strip().splitlines()) == \
        sorted(stages.NAMES)
    assert children.count("FINISHED") == len(stages.NAMES)
    heatmap = artifact_dir(main.run_id) / "heatmap_svcca.png"
    assert f"heatmap_svcca.png  {heatmap.stat().st_size:>10}  {sha256_file(heatmap)}  ok" in out
    child = finished(frame, "match")
    child = child[child["tags.mlflow.parentRunId"] == main.run_id].iloc[0]
    assert cli.main(["audit", child.run_id]) == 0
    assert main.run_id in capsys.readouterr().out.split("## parent")[1].split("## children")[0]
    assert cli.main(["audit", "0" * 32]) == 2
    assert "not found" in capsys.readouterr().err


def test_audit_fails_naming_a_changed_or_missing_artifact(tiny_run, own_tracking, capsys):
    """On a run of its own (the match stage, on a copy of the warm store)."""
    assert cli.main(["match", *tiny_run["args"][1:]]) == 0
    run_id = finished(runs(own_tracking), "match").iloc[0].run_id
    assert cli.main(["audit", run_id]) == 0
    path = artifact_dir(run_id) / "top_pairs.json"
    path.write_bytes(path.read_bytes().replace(b"0", b"1", 1))
    capsys.readouterr()
    assert cli.main(["audit", run_id]) == 1
    out = capsys.readouterr().out
    assert "CHANGED top_pairs.json: sha256 " in out and "NOT intact: 1 problem(s)" in out
    path.unlink()
    assert cli.main(["audit", run_id]) == 1
    assert "\nMISSING top_pairs.json\n" in capsys.readouterr().out
