"""The disk plan: what a stage will write, estimated before any work, checked against the
sizes on disk of the tiny run's finished entries."""

from __future__ import annotations

import shutil

from saeuniv.pipeline import Pipeline
from saeuniv.plan import planned_bytes
from saeuniv.store import Store


def _on_disk(entries) -> int:
    """Bytes of the files of store entries, as their manifests record them."""
    return sum(f["size"] for e in entries for f in e.manifest["files"].values())


def test_disk_plan_counts_what_the_store_lacks(tiny_run, own_store, tmp_path):
    store = Store(own_store)
    cfg = tiny_run["cfg"]
    pipe = Pipeline(cfg, store)
    warm = planned_bytes(pipe)
    assert warm["models"][0] == warm["saes"][0] == warm["codes"][0] == 0
    assert warm["matches"][0] > 0  # small, always counted
    codes = {(side.name, layer): _on_disk([e]) for side in pipe.sides
             for layer, e in side.codes.items()}
    models = _on_disk(pipe.up.model_entries.values())
    saes = _on_disk(e for side in pipe.sides for e in side.sae_entries.values())
    # the same config without its codes: the plan for them against their real size. The
    # estimate is an upper bound (every feature of these narrow SAEs may fire, where the
    # trained ones keep about a third): never below the finished codes plus the largest
    # layer (its shards and matrix are on disk at once), and at most 5 times that
    shutil.rmtree(own_store / "codes")
    full = planned_bytes(Pipeline(cfg, Store(own_store)), "extract")
    assert set(full) == {"models", "saes", "codes"}
    assert full["models"][0] == full["saes"][0] == 0
    peak = sum(codes.values()) + max(codes.values())
    assert peak <= full["codes"][0] <= 5 * peak, (full["codes"][0], peak)
    assert f"{len(codes)} layer(s)" in full["codes"][1]
    # another token budget: new codes in proportion to its tokens, the same models and SAEs
    other = Pipeline(cfg.replace(**{"extract.n_tokens": 1000}), Store(own_store))
    plan = planned_bytes(other, "extract")
    assert plan["models"][0] == plan["saes"][0] == 0
    rows = (other.up.windows_entry.meta["n_valid_tokens"],
            pipe.up.windows_entry.meta["n_valid_tokens"])
    assert rows[0] < rows[1]
    assert plan["codes"][0] * rows[1] == full["codes"][0] * rows[0]
    # an empty store: every model and SAE, within 10% of their files (the estimate counts
    # float32 weights; the safetensors headers and config files are the difference)
    fresh = planned_bytes(Pipeline(cfg, Store(tmp_path / "fresh")))
    assert abs(fresh["models"][0] - models) < 0.10 * models, (fresh["models"][0], models)
    assert abs(fresh["saes"][0] - saes) < 0.10 * saes, (fresh["saes"][0], saes)
