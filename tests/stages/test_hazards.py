"""Numerical hazards: NaN/inf activations, dead and constant SAE features, no pairs left
after filtering, a metric that comes out NaN. Each is caught and reported (a clear error,
a ``saeuniv.warning.*`` tag, a status in scores.json that the summary lists); none becomes a
score.

The pipeline tests run the real stages on the tiny config with untrained (random) family
models put in place of the trained ones, and untrained sae-lens folder SAEs, so no training
is needed: what they check is what the pipeline does with the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saeuniv import cli
from saeuniv.core import metrics
from saeuniv.core.matching import POLICIES, correlation, dead_features, match
from saeuniv.models import ActivationError, LoadedModel, build_model, check_finite, tl_config
from saeuniv.pipeline import Pipeline
from saeuniv.sides import Side
from saeuniv.stages import match as match_stage
from saeuniv.stages import similarity
from saeuniv.store import Store
from saeuniv.upstream import Upstream

from helpers import all_metrics

# -- the pure core ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["all_zero", "all_constant"])
def test_a_side_with_every_feature_dead_or_constant_gives_no_pairs(case):
    rng = np.random.default_rng(0)
    live = sp.csr_matrix((rng.random((60, 5)) > 0.6) * rng.random((60, 5)))
    dead = np.zeros((60, 7)) if case == "all_zero" else np.full((60, 7), 0.5)
    corr = correlation(sp.csr_matrix(dead), live)
    assert np.isnan(corr).all()  # zero variance: no correlation, not a number
    assert dead_features(sp.csr_matrix(dead)).all() and not dead_features(live).any()
    for policy in POLICIES:
        for c in (corr, corr.T):
            m = match(c, policy, threshold=-1.0)
            assert m.n == 0 and np.isnan(m.mean_corr), policy


def test_check_finite_counts_nan_inf_and_tokens():
    acts = torch.ones(10, 4)
    check_finite(acts, "layer 3", "fix it")  # finite: nothing raised
    acts[2, 1] = float("nan")
    acts[2, 3] = float("inf")
    acts[7, 0] = float("-inf")
    with pytest.raises(ActivationError, match=r"^layer 3: 1 NaN and 2 inf value\(s\) in 2 of 10 "
                       r"token\(s\); fix it$"):
        check_finite(acts, "layer 3", "fix it")
    big = torch.full((4, 4), 3e38)  # finite, though its float32 sum would overflow
    check_finite(big, "x", "y")


# -- the pipeline, on random models and SAEs --------------------------------------------------

def _folder_saes(root, side: str, d_in: int, n_layers: int, tweak=None) -> str:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(1 if side == "a" else 2)
    for layer in range(n_layers):
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in))
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        if tweak:
            tweak(layer, sae)
        sae.save_model(str(root / f"{side}_{layer}"))
    return str(root / f"{side}_{{layer}}")


def _dead_b0(layer, sae):  # every feature of B layer 0 is dead: a huge negative bias
    if layer == 0:
        with torch.no_grad():
            sae.b_enc.fill_(-1e6)


def _constant_a0(layer, sae):  # feature 0 of A layer 0 reads nothing: one constant value
    if layer == 0:
        with torch.no_grad():
            sae.W_enc[:, 0] = 0.0
            sae.b_enc[0] = 1.0


@pytest.fixture(scope="module")
def saes(tmp_path_factory, corpus_dir):
    """Folder SAEs for the tiny family's shapes (read only): A (xs: 2 layers x 16) with a
    constant feature at layer 0, B (s: 3 layers x 32) with every feature dead at layer 0;
    the command-line arguments that use them."""
    root = tmp_path_factory.mktemp("hazards")
    folder_a = _folder_saes(root, "a", 16, 2, _constant_a0)
    folder_b = _folder_saes(root, "b", 32, 3, _dead_b0)
    return ["--config", "tiny", "--set", f"corpus.source={corpus_dir}",
            "--set", f"sae_a={{source: folder, path: '{folder_a}'}}",
            "--set", f"sae_b={{source: folder, path: '{folder_b}'}}"]


@pytest.fixture()
def world(saes, tracking):
    """The folder SAEs' arguments, and a store and MLflow database of the test's own (a
    store another test wrote to could hold the entries this one must build)."""
    return {"store": Path(os.environ["SAEUNIV_HOME"]), "args": saes}


@pytest.fixture()
def random_models(monkeypatch):
    """Untrained family models in place of trained ones; ``poison(side, layer)`` makes the
    model's residual stream NaN from that block on."""
    models: dict[str, LoadedModel] = {}
    poisoned: dict[str, int] = {}

    def model(self):
        name = self.ref.name
        if name not in models:
            member = self.member
            torch.manual_seed(0)
            net = build_model(tl_config(member, len(self.tokenizer),
                                        self.cfg.family.context, 0).to_dict()).eval()
            if name in poisoned:
                with torch.no_grad():
                    net.blocks[poisoned[name]].mlp.W_out.fill_(float("nan"))
            models[name] = LoadedModel(name, net, member.n_layers, member.d_model,
                                       self.model_key)
        return models[name]

    monkeypatch.setattr(Side, "model", property(model))
    monkeypatch.setattr(Side, "model_key", property(lambda self: "random-" + self.ref.name + (
        "-nan" if self.ref.name in poisoned else "")))
    monkeypatch.setattr(Side, "model_entry", property(lambda self: None))
    monkeypatch.setattr(Upstream, "model_entries", property(lambda self: {}))
    return lambda name, layer: poisoned.__setitem__(name, layer)


def _new_runs(before: set) -> list:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in runs if r.info.run_id not in before]


def _run_ids() -> set:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return {r.info.run_id for r in mlflow.search_runs(search_all_experiments=True,
                                                       output_format="list")}


def test_nan_activations_fail_extraction_naming_model_layer_and_count(world, random_models,
                                                                      capsys):
    random_models("xs", 1)  # A's block 1 writes NaN: layer 0 is fine, layer 1 is not
    store = world["store"]
    before = _run_ids()
    assert cli.main(["extract", *world["args"]]) == 2
    err = capsys.readouterr().err
    pipe = Pipeline(cli._config(cli.build_parser().parse_args(["extract", *world["args"]])),
                    Store(store))
    batch = pipe.cfg.extract.batch_size
    tokens = int(pipe.a.windows.mask[:batch].sum())
    message = (f"model a:xs layer 1, windows 0..{batch - 1}: activations: {tokens * 16} NaN and 0 "
               f"inf value(s) in {tokens} of {tokens} token(s); check the model's weights and "
               "dtype (try dtype: float32)")
    assert f"saeuniv: error: {message}" in err
    assert not list((store / "codes").glob("*/manifest.json"))  # no codes written
    assert not list(store.rglob("shard-*"))  # not even a shard
    (run,) = _new_runs(before)
    assert run.info.status == "FAILED" and run.data.tags["saeuniv.stage"] == "extract"
    assert message in run.data.tags["saeuniv.error"]
    # the SAE preflight (saes stage) reads the same activations: refused the same way
    before = _run_ids()
    assert cli.main(["saes", *world["args"]]) == 2
    assert re.search(r"saeuniv: error: model a:xs layer 1: activations on the first 256 "
                     r"analysis tokens: \d+ NaN and 0 inf value\(s\)", capsys.readouterr().err)
    assert not list((store / "preflight").glob("*/manifest.json"))
    (run,) = _new_runs(before)
    assert run.info.status == "FAILED"


def test_dead_constant_and_unmatched_features_are_reported_not_scored(world, random_models,
                                                                      monkeypatch):
    store = Store(world["store"])
    before = _run_ids()
    assert cli.main(["run", *world["args"]]) == 0
    new = _new_runs(before)
    assert {r.info.status for r in new} == {"FINISHED"}
    runs = {r.data.tags["saeuniv.stage"]: r for r in new}
    assert {"main", "models", "saes", "extract", "match", "similarity"} <= set(runs)
    # every feature of B layer 0 is dead: the extract run says so
    dead = runs["extract"].data.tags["saeuniv.warning.dead_b0"]
    assert "every feature of SAE b layer 0 is dead" in dead
    assert not any(k.startswith("saeuniv.warning.dead_a") for k in runs["extract"].data.tags)
    # ... so no pair is left for A layer I / B layer 0, and the match run names why
    tags = runs["match"].data.tags
    for la in (0, 1):
        assert re.search(r"no pairs left after matching .*dead or constant features: \d of A, "
                         r"128 of B\); lower match.threshold",
                         tags[f"saeuniv.warning.match.a{la}-b0"])
    found = all_metrics(runs["match"])
    assert found["n_dead_b/a0-b0"] == 128 and found["n_dead_b/a0-b1"] < 128
    # the constant feature 0 of A layer 0 counts as dead and is never paired; A's count does
    # not depend on B's features being alive
    assert 1 <= found["n_dead_a/a0-b0"] == found["n_dead_a/a0-b1"] < 64
    cfg = cli._config(cli.build_parser().parse_args(["run", *world["args"]]))
    pipe = Pipeline(cfg, store)
    assert 0 not in match_stage.load(match_stage.entry(pipe, 0, 1)).a
    # the scores record the status; no metric is logged for the pair; the summary lists it
    status = similarity.load(similarity.entry(pipe, 0, 0))["status"]
    assert status.startswith("too few pairs (0 < similarity.min_pairs=5)")
    for stage in ("similarity", "main"):
        run, logged = runs[stage], all_metrics(runs[stage])
        assert run.data.tags["saeuniv.warning.scores.a0-b0"].endswith(status)
        assert "svcca/a0-b0" not in logged and logged["n_pairs/a0-b0"] == 0
        assert "svcca/a0-b1" in logged  # the live layer pairs are scored
    summary = mlflow.artifacts.load_text(f"runs:/{runs['main'].info.run_id}/summary.md")
    assert "## Layer pairs without a score" in summary
    assert f"- a0-b0: {status}" in summary and "- a1-b0: " in summary
    assert "- a0-b1:" not in summary
    grids = mlflow.artifacts.load_dict(f"runs:/{runs['main'].info.run_id}/grids.json")
    assert grids["metrics"]["svcca"]["observed"][0][0] is None

    # zero overlap after filtering: live features, but no pair passes the threshold
    before = _run_ids()
    assert cli.main(["similarity", *world["args"], "--threshold", "1.0"]) == 0
    (run,) = _new_runs(before)
    warned = {k for k in run.data.tags if k.startswith("saeuniv.warning.scores.")}
    assert warned == {f"saeuniv.warning.scores.a{la}-b{lb}" for la in (0, 1) for lb in (0, 1, 2)}
    assert not any(k.startswith(("svcca/", "rsa/")) for k in all_metrics(run))

    # a metric that comes out NaN is an error for that pair, never a score
    real = metrics.permutation_null

    def nan_cka(name, *a, **kw):
        null = real(name, *a, **kw)
        return dataclasses.replace(null, observed=float("nan")) if name == "cka" else null

    monkeypatch.setattr(metrics, "permutation_null", nan_cka)
    before = _run_ids()
    assert cli.main(["similarity", *world["args"], "--n-perm", "19"]) == 0
    (run,) = _new_runs(before)
    assert "cka came out nan on" in run.data.tags["saeuniv.error.cka.a0-b1"]
    logged = all_metrics(run)
    assert "cka/a0-b1" not in logged and "rsa/a0-b1" in logged
    scores = similarity.load(similarity.entry(
        Pipeline(cfg.replace(**{"similarity.n_perm": 19}), store), 0, 1))
    assert set(scores["metrics"]["cka"]) == {"error"}
    assert json.dumps(scores).count("NaN") == 0
