"""Planted truth through the real stages: a model pair whose answer is known by construction
(``tests/planted.py``: B is A with its residual stream rotated, B's SAEs are A's rotated and
reordered), run with ``saeuniv similarity`` (which builds the codes and the matches on the
way) into a private store and MLflow database; the scores are read back from the logged
metrics and the pairs from the store, as a user would.

* planted: matching must find the planted pairs and every score must be high and
  significant;
* B's decoder rows shuffled (encoder unchanged, so the same codes and the same pairs):
  every score must lie within its permutation null;
* B's SAE of the other layer (labelled as this layer's): the planted pairs must be lost and
  every score must fall well below the planted one. It does not fall to the null: the
  other layer's SAE is another dictionary of the same residual stream, so matching by
  correlation pairs features with nearby directions and their decoder rows still agree
  more than shuffled pairs do (z about 4 to 6 here, against 23 to 39 planted; the planted
  run's cross-layer pairs a0-b1 and a1-b0 show the same, z about 3 to 8). The permutation
  null shuffles pairs after matching, so it does not account for the matching's own choice
  of aligned directions. The test pins the drop, not chance.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from saeuniv import cli
from saeuniv.cells import cell_metrics
from saeuniv.config import load_config
from saeuniv.models import load_outside_model
from saeuniv.pipeline import Pipeline
from saeuniv.stages import match
from saeuniv.store import Store

import planted
from helpers import private_runs, runs

METRICS = ("svcca", "cka", "rsa", "mutual_knn")
N_PERM = 99
# planted scores must exceed these (decoder noise keeps them below 1; mutual kNN, a
# neighbourhood overlap, is the most sensitive to that noise)
HIGH = {"svcca": 0.95, "cka": 0.95, "rsa": 0.9, "mutual_knn": 0.75}
Z_PLANTED = 10.0   # planted scores lie this many null sds above the null mean
Z_CHANCE = 3.0     # a control within its null: |z| below this (two-sided 0.3% per score)
DROP = 0.2         # the wrong layer's SAE scores at least this much below the planted one
SAE_SOURCES = {"planted": "b", "shuffled": "b_shuffled", "wrong_layer": "b_wrong_layer"}
DIAGONAL = [(layer, layer) for layer in range(planted.N_LAYERS)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Models A and B and their SAE folders (``tests/planted.py``)."""
    return planted.build(tmp_path_factory.mktemp("planted"))


def overrides(pair, corpus_dir, b_saes: str) -> dict:
    sae = pair["sae"]
    return {
        "corpus.source": str(corpus_dir),
        "model_a": {"source": "hf", "name": "planted-a", "path": str(pair["a"])},
        "model_b": {"source": "hf", "name": "planted-b", "path": str(pair["b"])},
        "sae_a": {"source": "folder", "path": str(sae / "a" / "layer_{layer}")},
        "sae_b": {"source": "folder", "path": str(sae / b_saes / "layer_{layer}")},
        "extract.n_tokens": 2000, "similarity.n_perm": N_PERM,
    }


def cli_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        if isinstance(value, dict):  # a flow mapping; quoted paths keep "{layer}" literal
            value = "{" + ", ".join(f'{k}: "{v}"' for k, v in value.items()) + "}"
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def results(pair, corpus_dir, tmp_path_factory):
    """One ``saeuniv similarity`` per B SAE set (planted, shuffled, wrong layer), each in its
    own experiment of one private MLflow database and store: per case, the similarity run's
    metrics and the matched pairs of every layer pair."""
    root = tmp_path_factory.mktemp("planted_runs")
    out = {}
    with private_runs(root) as uri:
        for case, b_saes in SAE_SOURCES.items():
            values = overrides(pair, corpus_dir, b_saes)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = cli.main(["similarity", "--config", "tiny", "--experiment", case]
                                  + cli_args(values))
            said = [line for line in err.getvalue().splitlines() if "error" in line.lower()]
            assert status == 0, f"{case}: saeuniv similarity failed: {said[-3:]}"
            pipe = Pipeline(load_config("tiny", values), Store(root / "store"))
            out[case] = {"pairs": {(la, lb): match.load(match.entry(pipe, la, lb))
                                   for la, lb in pipe.pairs}}
        frame = runs(uri)
    from mlflow import MlflowClient

    for case in SAE_SOURCES:
        exp = MlflowClient(uri).get_experiment_by_name(case).experiment_id
        row = frame[(frame.experiment_id == exp) & (frame.status == "FINISHED")
                    & (frame["tags.saeuniv.stage"] == "similarity")]
        assert len(row) == 1, f"{case}: expected one finished similarity run"
        out[case]["metrics"] = cell_metrics(row.run_id.iloc[0])
    return out


def planted_fraction(m, perm: np.ndarray) -> float:
    """Fraction of the kept pairs (a, b) that are planted: B's feature b is A's perm[b]."""
    return float(np.mean(perm[m.b] == m.a)) if m.n else 0.0


def test_b_reads_a_rotated_stream_and_b_codes_are_a_codes_reordered(pair, tmp_path):
    """The construction, checked through the pipeline's own model loading and hooks."""
    from sae_lens import SAE

    ids = planted.sample_ids(pair["tokenizer"], n_docs=4)
    res = {}
    for side in "ab":
        ref = load_config("tiny", {"model_a": {"source": "hf", "name": side,
                                               "path": str(pair[side])}}).model_a
        model = load_outside_model(ref, Store(tmp_path), key=side)
        res[side] = model.residuals(ids, list(range(planted.N_LAYERS)))
    R = torch.as_tensor(pair["R"], dtype=torch.float32)
    for layer in range(planted.N_LAYERS):
        xa, xb = res["a"][layer], res["b"][layer]
        assert xa.abs().max() > 0.1  # a stream worth rotating
        assert xa[..., planted.D_LIVE:].abs().max() == 0  # A's stream stays in the live part
        torch.testing.assert_close(xb, xa @ R.T, atol=1e-5, rtol=1e-4)
        codes = {s: SAE.load_from_disk(str(pair["sae"] / s / f"layer_{layer}")).encode(
            res[s][layer]).detach() for s in "ab"}
        ca = codes["a"].reshape(-1, planted.D_SAE)[:, pair["perms"][layer]].double().numpy()
        cb = codes["b"].reshape(-1, planted.D_SAE).double().numpy()
        assert ((ca > 0).mean(axis=0) > 0.05).all()  # every feature fires
        # B's feature j is A's feature perm[j], up to B's encoder noise
        corr = [np.corrcoef(ca[:, j], cb[:, j])[0, 1] for j in range(planted.D_SAE)]
        assert min(corr) > 0.98, f"layer {layer}: B's codes are not A's reordered"


@pytest.mark.parametrize("layer", range(planted.N_LAYERS))
def test_matching_recovers_the_planted_pairs(results, pair, layer):
    m = results["planted"]["pairs"][(layer, layer)]
    perm = pair["perms"][layer]
    # every A feature is live and paired; the junk-token filter may drop some
    assert m.n >= 0.7 * planted.D_SAE, f"only {m.n} of {planted.D_SAE} features kept"
    assert planted_fraction(m, perm) >= 0.98, (
        f"a{layer}-b{layer}: {planted_fraction(m, perm):.3f} of kept pairs are planted")
    assert m.corr.min() > 0.98  # planted partners' codes are equal up to encoder noise


@pytest.mark.parametrize("la,lb", DIAGONAL)
def test_planted_pairs_score_high_and_significant(results, la, lb):
    got, key = results["planted"]["metrics"], f"a{la}-b{lb}"
    assert got[f"n_pairs/{key}"] == results["planted"]["pairs"][(la, lb)].n
    # decoder rows (and B's noise) lie in the live subspace: SVCCA keeps exactly its dimensions
    assert got[f"svcca_k_a/{key}"] == got[f"svcca_k_b/{key}"] == planted.D_LIVE
    for name in METRICS:
        score, z, p = got[f"{name}/{key}"], got[f"{name}_z/{key}"], got[f"{name}_p/{key}"]
        assert score > HIGH[name], f"{name}/{key} = {score:.3f}, planted: > {HIGH[name]}"
        assert z > Z_PLANTED, f"{name}_z/{key} = {z:.2f}, planted: > {Z_PLANTED}"
        assert p == pytest.approx(1 / (1 + N_PERM)), f"{name}_p/{key} = {p}"  # beats every draw


@pytest.mark.parametrize("la,lb", DIAGONAL)
def test_shuffled_decoder_rows_score_at_chance(results, pair, la, lb):
    key, got = f"a{la}-b{lb}", results["shuffled"]["metrics"]
    # the encoder is B's planted one: the codes, hence the pairs, are the planted run's
    m, ref = results["shuffled"]["pairs"][(la, lb)], results["planted"]["pairs"][(la, lb)]
    np.testing.assert_array_equal(m.a, ref.a)
    np.testing.assert_array_equal(m.b, ref.b)
    for name in METRICS:
        z = got[f"{name}_z/{key}"]
        assert abs(z) < Z_CHANCE, f"{name}_z/{key} = {z:.2f} with shuffled decoder rows"
        assert got[f"{name}_p/{key}"] > 0.01, f"{name}_p/{key} significant"
        assert got[f"{name}/{key}"] < HIGH[name]


@pytest.mark.parametrize("la,lb", DIAGONAL)
def test_wrong_layer_sae_loses_the_planted_pairs_and_scores_far_lower(results, pair, la, lb):
    key, got = f"a{la}-b{lb}", results["wrong_layer"]["metrics"]
    m = results["wrong_layer"]["pairs"][(la, lb)]
    assert planted_fraction(m, pair["perms"][la]) <= 0.1, "planted pairs found with the " \
        "other layer's SAE"
    assert m.n == 0 or m.corr.mean() < 0.9
    for name in METRICS:
        planted_score = results["planted"]["metrics"][f"{name}/{key}"]
        score = got[f"{name}/{key}"]
        assert score < planted_score - DROP, (
            f"{name}/{key}: {score:.3f} with the wrong layer's SAE, {planted_score:.3f} "
            f"planted; expected a drop of at least {DROP}")
        assert got[f"{name}_z/{key}"] < results["planted"]["metrics"][f"{name}_z/{key}"] / 2
