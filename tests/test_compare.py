"""``saeuniv compare``: two main runs lined up, by depth curves, difference heatmaps and the
params that differ."""

from __future__ import annotations

import mlflow
import numpy as np

from saeuniv import cli
from saeuniv.compare import depth_curve, diff_grid, load_run

from helpers import finished, runs


def test_compare_lines_up_two_main_runs(tiny_run, tiny_pipe, own_tracking, capsys):
    """Two main runs differing in match.threshold (a copy of the warm store, own MLflow
    database)."""
    base = tiny_run["args"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--threshold", "0.3"]) == 0
    capsys.readouterr()
    ids = list(finished(runs(own_tracking), "main").sort_values("start_time").run_id)
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
    scored = tiny_run["cfg"].similarity.metrics  # every metric both runs scored
    assert {"compare_depth_curves.png", "params_diff.csv", "artifacts.sha256.json",
            *(f"diff_heatmap_{m}.png" for m in scored)} <= arts
    table = mlflow.artifacts.load_text(f"runs:/{comp.iloc[0].run_id}/params_diff.csv")
    assert table.splitlines() == [f"param,{ids[0]},{ids[1]}", f"match.threshold,{t0},0.3"]
    # the curve is the runs' per-layer svcca metric against relative depth
    r0, r1 = load_run(client, ids[0]), load_run(client, ids[1])
    x, y = depth_curve(r0, "svcca")
    pipe = tiny_pipe
    assert list(x) == [pipe.a.depth(la) for la in pipe.a.layers]
    hist = {m.step: m.value for m in client.get_metric_history(ids[0], "svcca")}
    np.testing.assert_allclose([hist.get(la, np.nan) for la in pipe.a.layers], y)
    assert r0["n_layers"] == {s.name: s.info.n_layers for s in pipe.sides}
    d = diff_grid(r0, r1, "rsa")
    np.testing.assert_allclose(d, np.asarray(r1["grids"]["metrics"]["rsa"]["observed"], float)
                               - np.asarray(r0["grids"]["metrics"]["rsa"]["observed"], float))
    # different layer grids: a clear error, no compare run
    assert cli.main(base + ["--set", "layers_b=[0, 2]"]) == 0
    third = (set(finished(runs(own_tracking), "main").run_id) - set(ids)).pop()
    capsys.readouterr()
    assert cli.main(["compare", ids[0], third]) == 2
    assert "needs one layer grid" in capsys.readouterr().err
    assert cli.main(["compare", ids[0]]) == 2
    assert "at least two run ids" in capsys.readouterr().err
    assert cli.main(["compare", ids[0], comp.iloc[0].run_id]) == 2
    assert "compare takes main runs" in capsys.readouterr().err
    assert len(mlflow.search_runs(filter_string="tags.saeuniv.stage = 'compare'",
                                  search_all_experiments=True)) == 1
