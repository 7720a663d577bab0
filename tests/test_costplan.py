"""The cost plan (``saeuniv plan``): shapes read offline, work counted in closed form, units
two configs share counted once, rates measured once and cached, and every ready config
planned without a download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saeuniv import costs, rates
from saeuniv.config import load_config
from saeuniv.costreport import configs_of, render
from saeuniv.shapes import ShapeError, model_shape, sae_shape

from helpers import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
READY = sorted((ROOT / "configs").glob("*.yaml"))


class FixedRates:
    """Every operation at one rate, so seconds are work / rate."""

    how = "fixed"

    def __init__(self, rate: float = 1e9):
        self.rate = rate

    def note(self):
        return "fixed rates"

    def __getitem__(self, op):
        return self.rate


def test_shapes_come_from_the_family_the_table_transformer_lens_and_sae_lens():
    cfg = load_config("default")
    s = model_shape(cfg.model_b, cfg)
    assert (s.n_layers, s.d_model, s.source) == (6, 128, "family")
    assert s.n_params == 6 * (4 * 128 * 128 + 2 * 128 * 512)
    gemma = load_config(ROOT / "configs/gemma-2-2b-vs-9b.yaml")
    g = model_shape(gemma.model_b, gemma)
    assert (g.n_layers, g.d_model, g.source) == (42, 3584, "transformer-lens")
    sae = sae_shape(gemma.sae_a, gemma, 2304, 12)
    assert sae.d_sae == 16 * 1024 and sae.l0 > 0 and sae.source == "sae-lens"
    qwen = load_config(ROOT / "configs/qwen2.5-coder-0.5b-vs-1.5b.yaml")
    q = model_shape(qwen.model_b, qwen)
    assert (q.n_layers, q.d_model, q.source) == (28, 1536, "saeuniv.shapes")
    trained = sae_shape(qwen.sae_b, qwen, 1536, 3)
    assert (trained.d_sae, trained.l0) == (4 * 1536, 32)


def test_an_unknown_shape_is_refused_with_the_fix():
    cfg = load_config("default", {"model_a.source": "hf", "model_a.path": "/data/my-model",
                                  "model_a.name": "my-model"})
    with pytest.raises(ShapeError, match=r"'my-model' \(hf\) is not known offline: add .* "
                                         r"saeuniv.shapes.KNOWN_MODELS"):
        model_shape(cfg.model_a, cfg)


def test_work_in_closed_form():
    cfg = load_config("default", {"similarity.ceiling": False, "similarity.control": False})
    p = costs.Planner(cfg)
    n = cfg.extract.n_tokens
    assert len(p.pairs) == 3 * 6
    plan = costs.plan(cfg)
    # codes: (8 bytes x L0 + 4 bytes of row pointer) per token, every used layer of both sides
    sizes = {(s, layer): (8 * sh.l0 + 4) * n for (s, layer), sh in p.saes.items()}
    assert plan["extract"].disk == sum(sizes.values())
    # the correlation's sparse products: tokens x L0_a x L0_b multiply-adds per pair
    assert plan["match"].work["sparse"] == 18 * n * 32 * 32
    assert plan["match"].tasks == 18 and plan["convergence"].tasks == 0
    work = plan["match"]
    assert work.seconds(FixedRates(2.0)) == pytest.approx(sum(work.work.values()) / 2.0)


def test_pairs_by_depth_and_shared_units_counted_once():
    cfg = load_config("default", {"pairs": "depth"})
    assert len(costs.Planner(cfg).pairs) == 3  # each A layer once
    once, twice = costs.plan(cfg), costs.plan([cfg, cfg])
    assert {k: (v.tasks, v.flops) for k, v in once.items()} == \
        {k: (v.tasks, v.flops) for k, v in twice.items()}
    # the controls: twin SAEs (ceiling) and a random-init B (floor) add work to convergence
    bare = costs.plan(cfg.replace(**{"similarity.ceiling": False,
                                     "similarity.control": False}))
    assert once["convergence"].tasks > 0 == bare["convergence"].tasks
    assert once["models"].tasks == bare["models"].tasks == 2


def test_metric_null_work_grows_with_its_draws():
    small = costs.metric_cost("svcca", 500, 64, 128, n_perm=10)
    large = costs.metric_cost("svcca", 500, 64, 128, n_perm=1000)
    assert large.work["eig:32"] == 1000 and small.work["eig:32"] == 10
    n, k = 500, 32  # half of the narrower side's 64 dimensions
    assert large.flops - small.flops == pytest.approx(990 * (2 * n * k * k + 2 * k ** 3))


def test_rates_are_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rates, "measure", lambda op: calls.append(op) or 5.0)
    monkeypatch.setattr(rates, "current_load", lambda: 0.0)
    cache = tmp_path / "calibration.json"
    first = rates.CPURates(cache)
    assert first["gemm:8,8,8"] == 5.0 and first["gemm:8,8,8"] == 5.0
    assert calls == ["gemm:8,8,8"]
    again = rates.CPURates(cache)
    assert again["gemm:8,8,8"] == 5.0 and calls == ["gemm:8,8,8"]
    assert json.loads(cache.read_text())[rates.machine()] == {"gemm:8,8,8": 5.0}
    rates.CPURates(cache, refresh=True)["gemm:8,8,8"]
    assert len(calls) == 2


def test_a_rate_measured_on_a_busy_machine_is_used_but_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(rates, "measure", lambda op: 5.0)
    cache = tmp_path / "calibration.json"
    monkeypatch.setattr(rates, "current_load", lambda: 0.0)
    idle = rates.CPURates(cache)
    assert idle["gemm:8,8,8"] == 5.0 and "within the CPU count" in idle.note()
    assert "all 1 measured now" in idle.note()
    cached = rates.CPURates(cache)
    assert cached["gemm:8,8,8"] and "from the cached calibration" in cached.note()
    assert cached["elementwise"] and "1 of 2 measured now" in cached.note()
    monkeypatch.setattr(rates, "current_load", lambda: rates.busy_limit() + 1.5)
    busy = rates.CPURates(cache, refresh=True)
    assert busy["gemm:8,8,8"] == 5.0 and busy["eig:16"] == 5.0
    assert busy.busy == {"gemm:8,8,8": rates.busy_limit() + 1.5, "eig:16": rates.busy_limit() + 1.5}
    assert f"2 rate(s) measured now at load up to {rates.busy_limit() + 1.5:.1f}" in busy.note()
    # the idle measurement stays; the busy ones never reach the cache
    assert json.loads(cache.read_text())[rates.machine()] == {"gemm:8,8,8": 5.0, "elementwise": 5.0}


def test_both_sides_count_when_they_are_equally_wide():
    n, d = 300, 64
    cka = costs.metric_cost("cka", n, d, d, n_perm=0)
    assert cka.work == {f"gemm:{n},{d},{n}": 2 * (2 * n * n * d)}  # one Gram per side
    svcca = costs.metric_cost("svcca", n, d, d, n_perm=0)
    assert svcca.work == {f"svd:{n},{d}": 2} and svcca.flops == 2 * (2 * n * d * d)


def test_svcca_bases_are_svds_and_its_subsets_eigenproblems():
    bases = costs.metric_cost("svcca", 300, 64, 128, n_perm=0, repeats=5)
    assert bases.work == {"svd:300,64": 5, "svd:300,128": 5}
    # a fixed k: the draws are read off the pool's Grams, two m x m eigenvectors each
    fixed = costs.subset_cost("svcca", 400, 100, 64, 128, n_draws=7, k=25)
    assert fixed.work == {"gemm:400,64,400": 2 * 400 * 400 * 64,
                          "gemm:400,128,400": 2 * 400 * 400 * 128, "eigh:100": 14, "eig:25": 7}
    # no k: each draw is a whole SVCCA, its bases included
    free = costs.subset_cost("svcca", 400, 100, 64, 128, n_draws=7)
    assert free.work == costs.metric_cost("svcca", 100, 64, 128, 0, repeats=7).work
    rsa, cka = (costs.subset_cost(m, 400, 100, 64, 128, n_draws=7) for m in ("rsa", "cka"))
    assert rsa.work["gather"] == cka.work["gather"] == 2 * 100 * 100 * 7
    assert rsa.work["elementwise"] > cka.work["elementwise"]  # RSA ranks each draw


def test_a_real_measurement_is_a_positive_rate():
    for op in ("gemm:64,64,64", "eig:16", "eigh:16", "svd:40,12", "elementwise"):
        assert rates.measure(op) > 0


def test_a_large_svd_is_timed_small_and_scaled_by_its_work(monkeypatch):
    timed = []
    monkeypatch.setattr(rates, "_best", lambda fn: timed.append(fn) or 1.0)  # 1 s per call
    assert rates.measure("svd:40,12") == 1.0  # small enough to time as it is
    big, bigger = rates.measure("svd:4096,2048"), rates.measure("svd:8192,4096")
    assert rates.MAX_SVD < 4096 * 2048
    # both are timed at the same 1448 x 724 matrix (about MAX_SVD elements, same aspect),
    # and scaled by their work m * n * min(m, n)
    assert big == pytest.approx(1448 * 724 * 724 / (4096 * 2048 * 2048))
    assert big / bigger == pytest.approx(8)
    assert len(timed) == 3


def test_gpu_classes_without_a_gpu_use_the_datasheet(tmp_path):
    gpu = rates.GPURates("H100", FixedRates())
    assert gpu.how == f"H100 datasheet x {rates.GPU_EFFICIENCY}" or "measured" in gpu.how
    for op in ("eig:64", "eigh:64", "svd:100,64"):  # not sped up
        assert gpu[op] == FixedRates()[op]
    with pytest.raises(ValueError, match=r"GPU class 'TPU' is unknown; choose one of"):
        rates.GPURates("TPU", FixedRates())


def test_render_has_a_row_per_stage_with_work_and_a_total():
    cfg = load_config("default")
    text = render([cfg], FixedRates(), rates.GPURates("A100", FixedRates()))
    for stage in ("models", "saes", "extract", "match", "similarity", "convergence",
                  "subspaces", "total"):
        assert any(line.startswith(stage) for line in text.splitlines()), stage
    assert "18 layer pair(s)" in text and "assumed:" in text and "fixed rates" in text


@pytest.mark.parametrize("path", READY, ids=[p.stem for p in READY])
def test_every_ready_config_is_planned_offline(path):
    plan = costs.plan(configs_of(str(path), {}))
    assert plan["extract"].tasks > 0 and plan["match"].tasks > 0


def test_cli_prints_the_plan_from_cached_rates(tmp_path):
    cache = tmp_path / "store" / "calibration.json"
    cache.parent.mkdir()
    # every operation this plan needs at a known rate: the command must not measure
    ops = {op for c in costs.plan(load_config("tiny")).values() for op in c.work}
    cache.write_text(json.dumps({rates.machine(): dict.fromkeys(ops, 1000000000.0)}))
    before = cache.read_text()
    out = subprocess.run(
        [sys.executable, "-m", "saeuniv.cli", "plan", "tiny", "--gpu", "A100",
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, env={**OFFLINE_ENV, "PATH": "/usr/bin:/bin"},
        cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "total" in out.stdout and "A100 datasheet" in out.stdout
    assert cache.read_text() == before
    bad = subprocess.run([sys.executable, "-m", "saeuniv.cli", "plan", "tiny", "--set",
                          "layers_a=[99]", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**OFFLINE_ENV, "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "layers_a [99] are outside xs (2 layers: 0..1)" in bad.stderr
