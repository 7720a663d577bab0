"""Ladders: the file checked before any model runs, every pair a child main run, each model's
SAEs and codes made once and shared, and the trend logged on the parent run."""

import collections
import csv
import io

import mlflow
import numpy as np
import pytest
import yaml

from saeuniv import cli
from saeuniv.config import ConfigError
from saeuniv.core.depth import band_mean
from saeuniv.ladder import load_ladder

MEMBERS = [{"name": "xs", "n_layers": 2, "d_model": 16, "d_mlp": 64, "d_head": 8},
           {"name": "s", "n_layers": 3, "d_model": 32, "d_mlp": 128, "d_head": 8},
           {"name": "m", "n_layers": 4, "d_model": 48, "d_mlp": 192, "d_head": 8}]


def write_ladder(tmp_path, corpus_dir, models=None, **ladder):
    data = {"name": "tiny-ladder", "base": "tiny",
            "corpus": {"source": str(corpus_dir)}, "family": {"members": MEMBERS},
            "ladder": {"pairs": "all", **ladder,
                       "models": models if models is not None else [
                           {"model": {"source": "family", "name": m["name"]}}
                           for m in MEMBERS]}}
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def family(name, **extra):
    return {"model": {"source": "family", "name": name}, **extra}


# -- the file --------------------------------------------------------------------------------
def test_pairs_all_and_adjacent(tmp_path, corpus_dir):
    four = MEMBERS + [{"name": "l", "n_layers": 5, "d_model": 64, "d_mlp": 256, "d_head": 8}]
    path = write_ladder(tmp_path, corpus_dir, [family(m["name"]) for m in four])
    data = yaml.safe_load(path.read_text())
    data["family"]["members"] = four
    path.write_text(yaml.safe_dump(data))
    assert load_ladder(path).pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    data["ladder"]["pairs"] = "adjacent"
    path.write_text(yaml.safe_dump(data))
    ladder = load_ladder(path)
    # neighbours, and every model against the largest
    assert ladder.pairs() == [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]
    cfg = ladder.config(1, 3)
    assert (cfg.model_a.name, cfg.model_b.name, cfg.name) == ("s", "l", "tiny-ladder:s-vs-l")
    assert cfg.extract.n_tokens == 1500  # the base config's (tiny) value, shared


def test_overrides_apply_to_every_pair_after_the_file(tmp_path, corpus_dir):
    path = write_ladder(tmp_path, corpus_dir)
    data = yaml.safe_load(path.read_text())
    data["match"] = {"threshold": 0.2}
    path.write_text(yaml.safe_dump(data))
    assert load_ladder(path).config(0, 2).match.threshold == 0.2
    ladder = load_ladder(path, {"match.threshold": 0.3})
    assert {ladder.config(i, j).match.threshold for i, j in ladder.pairs()} == {0.3}


@pytest.mark.parametrize("models, message", [
    ([family("xs"), family("s")], r"lists 2 model\(s\); a ladder needs at least 3"),
    ([family("xs"), family("s"), family("xs")],
     r"ladder.models\[0\] and ladder.models\[2\] are the same model \('xs'"),
    ([family("xs"), family("s"), {"model": {"source": "gguf", "name": "g", "path": "x.gguf"}}],
     r"ladder.models\[2\].params is missing"),
    ([family("xs"), family("s"), family("m", size=3)], r"unknown key\(s\) \['size'\]"),
    ([family("xs"), family("s"), {"model": {"source": "nope", "name": "m"}}],
     r"ladder.models\[2\]: .*model.source"),
    ([family("xs"), family("s"), family("m", params=-1)], r"params must be a positive"),
])
def test_bad_ladders_are_refused_with_the_fix(tmp_path, corpus_dir, models, message):
    with pytest.raises(ConfigError, match=message):
        load_ladder(write_ladder(tmp_path, corpus_dir, models))


def test_an_unknown_pairing_is_refused(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match=r"ladder.pairs must be one of \['all', 'adjacent'\]"):
        load_ladder(write_ladder(tmp_path, corpus_dir, pairs="neighbours"))


def test_an_sae_that_does_not_fit_its_model_stops_the_ladder_before_any_model_runs(
        tmp_path, corpus_dir, tracking, monkeypatch, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    for layer in range(4):  # SAEs 32 wide for m, whose d_model is 48
        sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae.save_model(str(tmp_path / "saes" / f"layer_{layer}"))
    path = write_ladder(tmp_path, corpus_dir, [
        family("xs"), family("s"),
        family("m", sae={"source": "folder", "path": str(tmp_path / "saes" / "layer_{layer}")})])
    trained = []
    monkeypatch.setattr("saeuniv.upstream.train_family", lambda *a, **k: trained.append(a))
    assert cli.main(["ladder", str(path)]) == 2
    err = capsys.readouterr().err
    assert "ladder pair xs (A) vs m (B)" in err and "d_in" in err and "48" in err, err
    assert trained == []
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["saeuniv.stage"] == "ladder"


# -- a run ------------------------------------------------------------------------------------
def test_a_ladder_of_three_tiny_models(tmp_path, corpus_dir, tracking, monkeypatch):
    import saeuniv.sides
    from saeuniv.store import Store

    loads = collections.Counter()
    real_load = saeuniv.sides.load_family_model

    def counted(entry):
        loads[entry.meta["name"]] += 1
        return real_load(entry)

    monkeypatch.setattr(saeuniv.sides, "load_family_model", counted)
    path = write_ladder(tmp_path, corpus_dir)
    data = yaml.safe_load(path.read_text())
    data["caveats"] = ["Tiny models trained on 16k tokens."]
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["ladder", str(path)]) == 0
    # each model loaded (and run) once: the later pairs read its SAEs and codes back
    assert loads == {"xs": 1, "s": 1, "m": 1}
    store = Store(tmp_path / "store")
    codes = [p for p in (store.root / "codes").iterdir() if (p / "manifest.json").exists()]
    # one entry per (model, layer), shared by its pairs, as are the ceiling's twin SAEs'
    # codes and the floor's random-init s and m (the B sides)
    assert len(codes) == 2 * (2 + 3 + 4) + (3 + 4)

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    [parent] = [r for r in runs if r.data.tags.get("saeuniv.stage") == "ladder"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == [
        "s vs m · one_to_one @ 0.05", "xs vs m · one_to_one @ 0.05", "xs vs s · one_to_one @ 0.05"]
    assert {r.info.status for r in children + [parent]} == {"FINISHED"}

    client = mlflow.MlflowClient()
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ladder.yaml", "ladder_scores.csv", "summary.md", "trend_param_ratio.png",
            "trend_smaller_size.png", "matrix_svcca.png"} <= files
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{parent.info.run_id}/ladder_scores.csv"))))
    metrics = ("svcca", "rsa", "cka", "mutual_knn")
    assert len(rows) == 3 * len(metrics)

    # the parent's middle-band score of a pair is the band mean of its child's grid
    child = next(r for r in children if r.data.tags["mlflow.runName"].startswith("xs vs m"))
    grids = mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/grids.json")
    for run in (parent, child):  # the caveats travel with the results
        summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.md")
        assert "**Caveats.** Tiny models trained on 16k tokens." in summary
    observed = np.array(grids["metrics"]["svcca"]["observed"], dtype=float)
    want = band_mean(observed, [(la + 1) / 2 for la in grids["layers_a"]],
                     [(lb + 1) / 4 for lb in grids["layers_b"]])
    row = next(r for r in rows if (r["model_a"], r["model_b"], r["metric"])
               == ("xs", "m", "svcca"))
    assert float(row["middle_score"]) == pytest.approx(want, abs=1e-12)
    assert parent.data.metrics["svcca_middle/xs-vs-m"] == pytest.approx(want, abs=1e-12)
    calibrated = np.array(grids["metrics"]["svcca"]["calibrated"], dtype=float)
    want_cal = band_mean(calibrated, [(la + 1) / 2 for la in grids["layers_a"]],
                         [(lb + 1) / 4 for lb in grids["layers_b"]])
    assert float(row["middle_calibrated"]) == pytest.approx(want_cal, abs=1e-12)
    assert parent.data.metrics["svcca_middle_cal/xs-vs-m"] == pytest.approx(want_cal)
    params = {r["model_a"]: int(r["params_a"]) for r in rows}
    assert params["xs"] < params["s"]
    assert float(row["param_ratio"]) == pytest.approx(
        int(row["params_b"]) / int(row["params_a"]))
