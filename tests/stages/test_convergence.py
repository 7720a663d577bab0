"""The calibrated reading of a run: calibrated scores in the store, the grid tests, the twin-SAE
ceilings, the random-init floor and the convergence index, as the tiny run logs them."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from saeuniv.cells import cell_metrics
from saeuniv.config import SAERef
from saeuniv.controls import floor_config, twin_config
from saeuniv.core.depth import in_band
from saeuniv.pipeline import Pipeline
from saeuniv.stages import convergence, similarity
from saeuniv.store import Store
from saeuniv.tracking import pair_key

from helpers import artifact_dir, finished, runs


def scored(pipe):
    """(layer pair, stored scores, null draws) of every compared layer pair."""
    for la, lb in pipe.pairs:
        e = similarity.entry(pipe, la, lb)
        yield (la, lb), similarity.load(e), similarity.load_nulls(e)


def test_stored_calibration_is_the_aristotelian_formula(tiny_pipe):
    sim = tiny_pipe.cfg.similarity
    n = intervals = 0
    for _, scores, nulls in scored(tiny_pipe):
        for name, r in scores["metrics"].items():
            if "observed" not in r:
                continue
            null = nulls[name]
            assert null.shape == (sim.n_perm,)
            tau = np.quantile(np.append(null, r["observed"]), 1 - sim.alpha,
                              method="inverted_cdf")
            assert r["tau"] == tau
            assert r["calibrated"] == pytest.approx(
                min(max((r["observed"] - tau) / (sim.s_max - tau), 0.0), 1.0), abs=1e-15)
            assert r["p"] == (1 + np.sum(null >= r["observed"])) / (1 + sim.n_perm)
            if r["interval"] is not None:  # None: a half too small for the metric (SVCCA)
                lo, hi = r["interval"]
                assert lo <= r["observed"] <= hi
                intervals += 1
            n += 1
    assert n >= 4 * len(sim.metrics) and intervals >= 4 * (len(sim.metrics) - 1)


@pytest.fixture(scope="module")
def main_run(tiny_run):
    main = finished(runs(tiny_run["uri"]), "main").iloc[0]
    return mlflow.get_run(main.run_id)


def test_main_run_logs_calibrated_scores_index_and_headline(tiny_run, tiny_pipe, main_run):
    m = {**main_run.data.metrics, **cell_metrics(main_run.info.run_id)}
    ceilings = {(name, side, x.step): x.value for name in tiny_pipe.cfg.similarity.metrics
                for side in "ab" for x in mlflow.MlflowClient().get_metric_history(
                    main_run.info.run_id, f"{name}_ceiling_{side}")}
    sim = tiny_pipe.cfg.similarity
    assert len(finished(runs(tiny_run["uri"]), "convergence")) >= 1
    depth_a = np.array([tiny_pipe.a.depth(la) for la in tiny_pipe.a.layers])
    depth_b = np.array([tiny_pipe.b.depth(lb) for lb in tiny_pipe.b.layers])
    middle = in_band(depth_a, sim.band)[:, None] & in_band(depth_b, sim.band)[None, :]
    for name in sim.metrics:
        for key in ("cal_middle", "middle_contrast", "middle_p", "middle_p_layers",
                    "best_cell_p", "index_median", "ceiling_fraction"):
            assert np.isfinite(m[f"{name}_{key}"]), (name, key)
        assert 0 < m[f"{name}_middle_p"] <= 1 and 0 < m[f"{name}_best_cell_p"] <= 1
        cal = np.array([[m.get(f"{name}_cal/{pair_key(la, lb)}", np.nan)
                         for lb in tiny_pipe.b.layers] for la in tiny_pipe.a.layers])
        assert np.isfinite(cal).sum() >= 4 and np.nanmin(cal) >= 0 and np.nanmax(cal) <= 1
        # the contrast, recomputed from the logged calibrated scores and the depths
        want = np.nanmean(cal[middle]) - np.nanmean(cal[~middle])
        assert m[f"{name}_middle_contrast"] == pytest.approx(want)
        assert m[f"{name}_cal_middle"] == pytest.approx(np.nanmean(cal[middle]))
        # the index, recomputed from the logged ceilings, floor and calibrated score
        for la, lb in tiny_pipe.pairs:
            key = pair_key(la, lb)
            if f"{name}_index/{key}" not in m:
                continue
            ceiling = np.sqrt(ceilings[name, "a", la] * ceilings[name, "b", lb])
            floor = m[f"{name}_floor/{key}"]
            assert m[f"{name}_index/{key}"] == pytest.approx(
                (m[f"{name}_cal/{key}"] - floor) / (ceiling - floor))
            if f"{name}_index_lo/{key}" in m:
                assert m[f"{name}_index_lo/{key}"] <= m[f"{name}_index/{key}"] + 1e-12
                assert m[f"{name}_index/{key}"] <= m[f"{name}_index_hi/{key}"] + 1e-12
    files = {p.name for p in artifact_dir(main_run.info.run_id).iterdir()}
    assert {"convergence.json", "heatmap_cka_cal.png", "heatmap_cka_index.png"} <= files
    conv = json.loads((artifact_dir(main_run.info.run_id) / "convergence.json").read_text())
    assert set(conv["metrics"]) == set(sim.metrics)
    assert conv["metrics"]["cka"]["tests"]["middle"]["p"] == m["cka_middle_p"]
    text = main_run.data.tags["mlflow.note.content"]
    assert "## Calibrated: does the middle band agree most?" in text
    for name in sim.metrics:
        assert f"- **{name}**: middle layers agree most: **" in text


def test_twin_saes_differ_from_the_run_s_only_in_their_seed(tiny_pipe):
    cfg, store = tiny_pipe.cfg, tiny_pipe.store
    for side in tiny_pipe.sides:
        twin = Pipeline(twin_config(cfg, side.name, side.used_layers), store)
        assert twin.pairs == [(layer, layer) for layer in side.used_layers]
        assert twin.a.sae_keys == side.sae_keys  # the run's own SAEs, not trained again
        for layer in side.used_layers:
            mine = side.sae_entries[layer]
            theirs = twin.b.sae_entries[layer]
            assert theirs.key != mine.key
            spec_mine, spec_twin = mine.manifest["spec"], theirs.manifest["spec"]
            assert spec_twin["sae"]["seed"] == spec_mine["sae"]["seed"] + 1
            spec_twin["sae"]["seed"] -= 1
            assert spec_twin == spec_mine
            assert not np.allclose(twin.b.decoder(layer), side.decoder(layer))


def test_floor_is_b_s_architecture_at_its_initial_weights(tiny_pipe):
    control = Pipeline(floor_config(tiny_pipe.cfg), tiny_pipe.store)
    assert control.pairs == tiny_pipe.pairs
    assert control.a.codes == tiny_pipe.a.codes  # A's codes are reused as they are
    trained, random = tiny_pipe.b.model.model, control.b.model.model
    assert control.b.model_key != tiny_pipe.b.model_key
    assert "random init" in control.b.model.name
    params = dict(trained.named_parameters())
    changed = [n for n, p in random.named_parameters() if not torch.equal(p, params[n])]
    assert len(changed) > len(params) // 2  # training moved the weights away from the init
    weights = next(p for n, p in random.named_parameters() if n.endswith("W_Q"))
    again = Pipeline(floor_config(tiny_pipe.cfg), tiny_pipe.store).b
    again.up.models.clear()
    assert torch.equal(weights, next(p for n, p in again.model.model.named_parameters()
                                     if n.endswith("W_Q")))  # seeded


def test_without_ceiling_and_control_the_floor_is_the_calibrated_null(tiny_run, own_store):
    cfg = tiny_run["cfg"].replace(**{"similarity.ceiling": False, "similarity.control": False})
    pipe = Pipeline(cfg, Store(own_store))
    res = convergence.results(pipe)
    assert any("similarity.ceiling: false" in note for note in res["notes"])
    assert any("similarity.control: false" in note for note in res["notes"])
    for r in res["metrics"].values():
        scored_cells = np.isfinite(r["grid"]["calibrated"])
        assert np.all(r["index"]["floor"][scored_cells] == 0)
        assert np.all(np.isnan(r["index"]["index"]))
        assert np.isfinite(r["headline"]["middle_p"])
        assert np.isnan(r["headline"]["index_median"])


def test_pretrained_saes_take_their_twin_from_the_config():
    release = SAERef("release", release="gemma-scope-2b-pt-res", id="layer_{layer}/width_16k/"
                     "average_l0_71", twin="layer_{layer}/width_16k/average_l0_141")
    assert release.twin_ref().sae_id(3) == "layer_3/width_16k/average_l0_141"
    folder = SAERef("folder", path="/saes/run1/layer_{layer}", twin="/saes/run2/layer_{layer}")
    assert folder.twin_ref().folder(2) == "/saes/run2/layer_2"
    assert SAERef("release", release="r", id="l{layer}").twin_ref() is None
    assert SAERef("train", seed_offset=0).twin_ref().seed_offset == 1
