"""The numbers of a finished tiny run, checked from outside the code that made them.

* Recomputation: each logged score of the main run is computed again from the run's own
  artefacts (``matched_pairs.csv``, ``config.yaml``) and the SAEs its lineage tags name, with
  the independent implementations below (numpy and scipy only, written from the papers'
  definitions, not from ``saeuniv.core``).
* Golden values: the run's headline numbers against ``tests/golden/tiny.json``, within the
  tolerances stored there. A change that moves them updates that file in the same commit and
  says why in the commit message.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from scipy import stats

from saeuniv.cells import cell_metrics

from helpers import runs

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny.json"


# ------------------------------------------------------------------------------------------
# independent implementations, from the definitions


def centred(X):
    return X - X.mean(axis=0)


def svcca(A, B, variance):
    """Mean canonical correlation of the SVD-reduced sides (Raghu et al., 2017), each side
    keeping the fewest directions whose squared singular values reach ``variance`` of the
    total; CCA through the whitened cross-covariance (not through orthonormal bases)."""
    def reduce(X):
        U, s, _ = np.linalg.svd(centred(X), full_matrices=False)
        energy = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(energy >= variance - 1e-15)) + 1
        return U[:, :k] * s[:k]

    a, b = reduce(A), reduce(B)

    def inv_sqrt(S):
        w, V = np.linalg.eigh(S)
        return V @ np.diag(w**-0.5) @ V.T

    M = inv_sqrt(a.T @ a) @ (a.T @ b) @ inv_sqrt(b.T @ b)
    rho = np.linalg.svd(M, compute_uv=False)
    return float(np.clip(rho, 0, 1).mean())


def rsa(A, B):
    """Spearman correlation of the upper triangles of the two row-correlation matrices."""
    iu = np.triu_indices(len(A), 1)
    return float(stats.spearmanr(np.corrcoef(A)[iu], np.corrcoef(B)[iu]).statistic)


def cka(A, B):
    """Linear CKA from centred Gram matrices: <HKH, HLH> / (|HKH| |HLH|) (Kornblith et al.)."""
    n = len(A)
    H = np.eye(n) - 1.0 / n
    K, L = H @ A @ A.T @ H, H @ B @ B.T @ H
    return float(np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)))


def mutual_knn(A, B, k=10):
    """Mean fraction of each row's k cosine nearest neighbours shared by both sides."""
    def neighbours(X):
        U = X / np.linalg.norm(X, axis=1, keepdims=True)
        S = U @ U.T
        np.fill_diagonal(S, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:k]) for row in S]

    na, nb = neighbours(A), neighbours(B)
    return float(np.mean([len(x & y) / k for x, y in zip(na, nb)]))


# ------------------------------------------------------------------------------------------
# the finished run, read back as a user would


@pytest.fixture(scope="module")
def finished_main(tiny_run):
    frame = runs(tiny_run["uri"])
    main = frame[(frame["tags.saeuniv.stage"] == "main") & (frame.status == "FINISHED")]
    run_id = main.sort_values("start_time").iloc[0].run_id
    run = mlflow.MlflowClient().get_run(run_id)
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/matched_pairs.csv")
    pairs = {}
    for row in csv.DictReader(io.StringIO(text)):
        key = (int(row["layer_a"]), int(row["layer_b"]))
        pairs.setdefault(key, []).append((int(row["a"]), int(row["b"])))
    cfg = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    # every number as a metric key: the run's own keys and its per-layer-pair tables
    metrics = {**run.data.metrics, **cell_metrics(run_id)}
    return {"run": run, "pairs": pairs, "cfg": cfg, "store": Path(tiny_run["store"]),
            "metrics": metrics}


def sae_folder(store: Path, key: str) -> Path:
    """A trained SAE's sae-lens folder in the store (``sae/<key>/sae``)."""
    return store / "sae" / key / "sae"


def decoder(run, store: Path, side: str, layer: int) -> np.ndarray:
    """W_dec (d_sae, d_model) of the SAE the run's lineage tag names for ``side`` and
    ``layer``, after checking that the SAE reads that layer of that side's model."""
    folder = sae_folder(store, run.data.tags[f"saeuniv.sae.{side}{layer}"])
    hook = json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"]
    assert hook == f"blocks.{layer}.hook_resid_post", (side, layer, hook)
    trained_on = json.loads((folder.parent / "manifest.json").read_text())["spec"]["model"]
    assert trained_on == run.data.tags[f"saeuniv.model_{side}.key"], (side, layer)
    return load_file(str(folder / "sae_weights.safetensors"))["W_dec"].astype(np.float64)


INDEPENDENT = {"svcca": lambda A, B, cfg: svcca(A, B, cfg["similarity"]["variance"]),
               "rsa": lambda A, B, cfg: rsa(A, B),
               "cka": lambda A, B, cfg: cka(A, B),
               "mutual_knn": lambda A, B, cfg: mutual_knn(A, B)}


def test_logged_scores_are_recomputed_from_the_runs_artefacts(finished_main):
    run, cfg = finished_main["run"], finished_main["cfg"]
    metrics = finished_main["metrics"]
    assert set(cfg["similarity"]["metrics"]) == set(INDEPENDENT)
    checked = 0
    for (la, lb), pairs in sorted(finished_main["pairs"].items()):
        key = f"a{la}-b{lb}"
        assert metrics[f"n_pairs/{key}"] == len(pairs)
        ia, ib = np.array(pairs).T
        assert len(set(ia)) == len(ia) and len(set(ib)) == len(ib)  # one_to_one matching
        A = decoder(run, finished_main["store"], "a", la)[ia]
        B = decoder(run, finished_main["store"], "b", lb)[ib]
        for name, independent in INDEPENDENT.items():
            if f"{name}/{key}" in metrics:
                assert metrics[f"{name}/{key}"] == pytest.approx(independent(A, B, cfg),
                                                                 abs=1e-6), (name, key)
                checked += 1
    n_scored = sum(1 for k in metrics if k.split("/")[0] in INDEPENDENT and "/" in k)
    assert checked == n_scored >= 4 * len(INDEPENDENT)


def test_logged_p_values_count_null_draws(finished_main):
    """p = (1 + #null >= observed) / (1 + n_perm): a whole number of draws, never 0."""
    metrics = finished_main["metrics"]
    n_perm = finished_main["cfg"]["similarity"]["n_perm"]
    ps = {k: v for k, v in metrics.items() if k.split("/")[0].endswith("_p") and "/" in k}
    assert ps
    for name, p in ps.items():
        count = p * (n_perm + 1)
        assert count == pytest.approx(round(count), abs=1e-9), name
        assert 1 <= round(count) <= n_perm + 1, name


# ------------------------------------------------------------------------------------------
# golden values

UPDATE_ENV = "SAEUNIV_UPDATE_GOLDEN"


def headline(run, metrics: dict[str, float]) -> dict[str, float]:
    """The numbers the golden file pins: every layer pair's scores and pairs kept, SAE
    quality per layer (``<name>@<layer>``), each model's final validation loss."""
    client = mlflow.MlflowClient()
    out = {k: v for k, v in metrics.items()
           if k.split("/")[0] in (*INDEPENDENT, "n_pairs") and "/" in k}
    for name in ("sae_fvu", "sae_l0", "sae_dead"):
        for side in "ab":
            for m in client.get_metric_history(run.info.run_id, f"{name}_{side}"):
                out[f"{name}_{side}@{m.step}"] = m.value
    return dict(sorted(out.items()))


def tolerance(name: str, tolerances: dict) -> float:
    """The absolute tolerance of a golden value: the entry whose prefix names it."""
    prefix = max((p for p in tolerances if name.startswith(p)), key=len)
    return tolerances[prefix]


def test_headline_numbers_match_the_golden_file(finished_main, tiny_run):
    got = headline(finished_main["run"], finished_main["metrics"])
    models = [r for _, r in runs(tiny_run["uri"]).iterrows()
              if r["tags.saeuniv.stage"] == "models" and r.status == "FINISHED"][0]
    for name in ("val_loss_xs", "val_loss_s", "param_ratio"):
        got[name] = float(models[f"metrics.{name}"])
    if os.environ.get(UPDATE_ENV) == "1":
        golden = json.loads(GOLDEN.read_text())
        golden["values"] = got
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        pytest.fail(f"{UPDATE_ENV}=1: wrote {GOLDEN}; review the diff and commit it with "
                    "the reason the numbers moved")
    golden = json.loads(GOLDEN.read_text())
    assert set(got) == set(golden["values"]), set(got) ^ set(golden["values"])
    off = {name: (got[name], want) for name, want in golden["values"].items()
           if abs(got[name] - want) > tolerance(name, golden["tolerance"])}
    assert not off, (f"{len(off)} headline numbers moved beyond tolerance (got, golden): "
                     f"{off}; if the change is intended, rerun with {UPDATE_ENV}=1 and "
                     "commit tests/golden/tiny.json saying why")
