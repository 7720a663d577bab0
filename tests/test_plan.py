"""The disk plan: what a stage will write, estimated before any work."""

from __future__ import annotations

from saeuniv.pipeline import Pipeline
from saeuniv.plan import planned_bytes
from saeuniv.store import Store


def test_disk_plan_counts_what_the_store_lacks(tiny_run, own_store, tmp_path):
    store = Store(own_store)
    cfg = tiny_run["cfg"]
    warm = planned_bytes(Pipeline(cfg, store))
    assert warm["models"][0] == warm["saes"][0] == warm["codes"][0] == 0
    assert warm["matches"][0] > 0  # small, always counted
    # another token budget: new windows and codes, the same models and SAEs
    other = Pipeline(cfg.replace(**{"extract.n_tokens": 1000}), store)
    plan = planned_bytes(other, "extract")
    assert set(plan) == {"models", "saes", "codes"}
    assert plan["models"][0] == plan["saes"][0] == 0
    rows = other.up.windows_entry.meta["n_valid_tokens"]
    n_a, n_b = len(other.a.layers), len(other.b.layers)
    l0 = min(cfg.sae.expansion * 16, 128)  # standard SAEs: width 4 x 16, 4 x 32, capped
    per_layer = {16: (8 * l0 + 4) * rows, 32: (8 * min(cfg.sae.expansion * 32, 128) + 4) * rows}
    expected = (per_layer[16] * n_a + per_layer[32] * n_b
                + per_layer[32])  # one layer's shards and matrix on disk at once
    assert plan["codes"][0] == expected and f"{n_a + n_b} layer(s)" in plan["codes"][1]
    # an empty store: every model and SAE, close to their real sizes
    fresh = planned_bytes(Pipeline(cfg, Store(tmp_path / "fresh")))
    pipe = Pipeline(cfg, store)
    weights = sum(4 * e.meta["params"] for e in pipe.up.model_entries.values())
    assert abs(fresh["models"][0] - weights) < 0.05 * weights
    sae_files = sum(f["size"] for side in pipe.sides for e in side.sae_entries.values()
                    for f in e.manifest["files"].values())
    assert abs(fresh["saes"][0] - sae_files) < 0.05 * sae_files
