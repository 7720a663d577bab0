"""The ``similarity`` stage: score the paired decoder rows of every layer pair with each
metric of ``similarity.metrics``, against its seeded permutation null, raw and calibrated.

Inputs: the layer pair's matched pairs (``stages.match``) and the two SAEs' decoder rows.
Build (``scores`` store entry): ``scores.json`` holds, per metric of the registry
``saeuniv.core.metrics.METRICS``, the observed score, null mean and sd, z, p, the
calibration (``tau``, ``calibrated``), the interval of the score over random halves of the
pairs (``interval``) and the metric's details (SVCCA: directions kept, the Lan-compatible
score); ``nulls.npz`` holds each metric's null draws, in draw order, for the grid-wide
tests of the ``convergence`` stage. Logged per layer pair, as a row of the table
``scores_cells.json`` (and as keys ``<name>/aI-bJ`` with ``tracking.per_cell_metrics``, see
``saeuniv.cells``): ``n_pairs``, ``<metric>`` and ``<metric>_<field>`` for ``cal`` (the
calibrated score), ``null_mean``, ``z``, ``p`` and the details (``k_a``, ``k_b``,
``lan_compatible``), e.g. ``svcca``, ``svcca_cal``, ``svcca_z`` (see ``numbers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from tqdm.auto import tqdm

from .. import matchers
from ..cells import log_cells
from ..core import matching, metrics
from ..core.depth import band_mean
from ..store import Entry
from ..tracking import pair_key, warn
from . import match

# stored in scores.json with each score but not logged per layer pair: the score itself is
# logged under the metric's own name, the null's spread and settings are in the config
NOT_LOGGED = ("observed", "null_sd", "n_perm", "seed", "tau", "interval")
LOGGED_AS = {"calibrated": "cal"}  # short metric-key names of stored fields


def spec(pipe, la: int, lb: int, matches: Entry) -> dict:
    return {"matches": matches.key, "sae_a": pipe.a.sae_keys[la], "sae_b": pipe.b.sae_keys[lb],
            "similarity": pipe.cfg.similarity.scoring(), **pipe.device_key}


def entry(pipe, la: int, lb: int) -> Entry:
    """The ``scores`` entry of A layer ``la`` and B layer ``lb``, built when missing."""
    m = match.entry(pipe, la, lb)
    return pipe.store.get_or_create("scores", spec(pipe, la, lb, m),
                                    lambda out: build(pipe, la, lb, m, out))[0]


def score(name: str, A: np.ndarray, B: np.ndarray, sim,
          device=None) -> tuple[dict, np.ndarray | None]:
    """One metric against its permutation null, as stored in ``scores.json``, and its null
    draws (None when the metric could not score these pairs). ``device``: where the null's
    draws run (``Pipeline.device``; None: numpy)."""
    metric = metrics.METRICS[name]
    kwargs = metric.kwargs(variance=sim.variance)
    try:
        null = metrics.permutation_null(name, A, B, n_perm=sim.n_perm, seed=sim.seed,
                                        alpha=sim.alpha, s_max=sim.s_max, device=device,
                                        **kwargs)
    except ValueError as err:  # e.g. fewer pairs than SVCCA directions
        return {"error": str(err)}, None
    if not np.isfinite(null.observed):
        return {"error": f"{name} came out {null.observed} on {len(A)} pairs (degenerate "
                         "decoder rows)"}, None
    out = {"observed": null.observed, "null_mean": null.null_mean, "null_sd": null.null_sd,
           "z": null.z, "p": null.p, "n_perm": null.n_perm, "seed": null.seed,
           "tau": null.tau, "calibrated": null.calibrated,
           "interval": interval(name, A, B, null.observed, sim, kwargs)}
    if metric.details is not None:
        out.update(metric.details(A, B, **kwargs))
    return out, null.null


def interval(name: str, A: np.ndarray, B: np.ndarray, observed: float, sim,
             kwargs: dict) -> list[float] | None:
    """The 95% interval of a score over its pairs, from ``similarity.n_halves`` random
    halves of them (None: no halves asked for, too few pairs, or a half the metric cannot
    score)."""
    half = len(A) // 2
    if not sim.n_halves or half < sim.min_pairs:
        return None
    try:
        halves = metrics.subset_null(name, A, B, half, sim.n_halves, sim.seed, observed,
                                     **kwargs)
    except ValueError:  # e.g. fewer pairs in a half than SVCCA directions
        return None
    if not np.all(np.isfinite(halves.null)):
        return None
    return list(metrics.half_sample_interval(observed, halves.null))


def build(pipe, la: int, lb: int, matches: Entry, out: Path) -> dict:
    return build_pairs(pipe, la, lb, match.load(matches), out)


def build_pairs(pipe, la: int, lb: int, m: matching.Matches, out: Path) -> dict:
    """Score pairs ``m`` of A layer ``la`` and B layer ``lb``; write ``scores.json`` and
    ``nulls.npz``."""
    sim = pipe.cfg.similarity
    result = {"layer_a": la, "layer_b": lb, "n_pairs": m.n, "metrics": {}, "status": "ok"}
    nulls = {}
    if m.n < sim.min_pairs:
        result["status"] = (f"too few pairs ({m.n} < similarity.min_pairs={sim.min_pairs}); "
                            "lower match.threshold or similarity.min_pairs")
    else:
        A, B = pipe.a.decoder(la)[m.a], pipe.b.decoder(lb)[m.b]
        for name in sim.metrics:
            result["metrics"][name], null = score(name, A, B, sim, pipe.device)
            if null is not None:
                nulls[name] = null
    np.savez(out / "nulls.npz", **nulls)
    (out / "scores.json").write_text(json.dumps(result, indent=1, default=json_default))
    return {"status": result["status"], "n_pairs": m.n}


def json_default(x):
    """numpy scalars as Python numbers in stored JSON."""
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def load(e: Entry) -> dict:
    """The stored scores of a layer pair (``scores.json``)."""
    return json.loads(e.file("scores.json").read_text())


def load_nulls(e: Entry) -> dict[str, np.ndarray]:
    """The null draws of each metric that scored the layer pair, shape (n_perm,)."""
    with np.load(e.file("nulls.npz")) as z:
        return {name: z[name] for name in z.files}


def numbers(scores: dict, key: str) -> dict[str, float]:
    """A layer pair's stored scores as ``n_pairs``, ``<metric>`` and ``<metric>_<field>``
    numbers; a pair or metric without a score gets a warning or error tag instead."""
    out = {"n_pairs": scores["n_pairs"]}
    if scores.get("status", "ok") != "ok":
        warn(f"scores.{key}", f"A layer {scores['layer_a']} / B layer {scores['layer_b']} not "
             f"scored: {scores['status']}")
    for name, r in scores["metrics"].items():
        if "error" in r:
            mlflow.set_tag(f"saeuniv.error.{name}.{key}", r["error"][:500])
            continue
        out[name] = r["observed"]
        for field, value in r.items():  # calibrated, null_mean, z, p and the details
            if field not in NOT_LOGGED and value is not None and np.isfinite(value):
                out[f"{name}_{LOGGED_AS.get(field, field)}"] = value
    return out


def log_scores(scored: dict[tuple[int, int], dict], per_cell_metrics: bool) -> None:
    """Log the stored scores of each layer pair (``(la, lb)`` -> ``scores.json``) as the
    table ``scores_cells.json`` (``saeuniv.cells``)."""
    log_cells({(la, lb): numbers(s, pair_key(la, lb)) for (la, lb), s in scored.items()},
              "scores", per_cell_metrics)


def cell(pipe, la: int, lb: int) -> None:
    """Build the layer pair's scores and, with ``match.compare``, those of every matcher's
    pairs (``saeuniv.tasks``)."""
    entry(pipe, la, lb)
    if pipe.cfg.match.compare:
        for name in matchers.names(pipe):
            matcher_entry(pipe, la, lb, name)


def run(pipe) -> None:
    scored = {(la, lb): load(entry(pipe, la, lb))
              for la, lb in tqdm(pipe.pairs, desc="similarity", unit="layer pair")}
    log_scores(scored, pipe.cfg.tracking.per_cell_metrics)
    if pipe.cfg.match.compare:
        log_by_matcher(pipe)


def matcher_entry(pipe, la: int, lb: int, name: str) -> Entry | None:
    """The ``scores`` entry of matcher ``name``'s pairs (``match.compare``; see
    ``saeuniv.matchers``), built when missing; None when the matcher has no pairs stored
    (``vocab`` without a readable output head)."""
    m = match.entry(pipe, la, lb)
    cmp = match.compare_entry(pipe, la, lb, m)
    pairs, main = matchers.load(cmp).get(name), match.load(m)
    if pairs is None:
        return None
    if np.array_equal(pairs.a, main.a) and np.array_equal(pairs.b, main.b):
        return entry(pipe, la, lb)  # the run's own pairs: scored already
    spec_ = {"matchers": cmp.key, "matcher": name, "sae_a": pipe.a.sae_keys[la],
             "sae_b": pipe.b.sae_keys[lb], "similarity": pipe.cfg.similarity.scoring()}
    return pipe.store.get_or_create(
        "scores", spec_,
        lambda out: build_pairs(pipe, la, lb, pairs, out))[0]


def by_matcher(pipe) -> tuple[dict, dict]:
    """Each metric's scores under every matcher: per layer pair ``{(la, lb, matcher):
    {metric: scores}}``, and the mean calibrated score of the middle-band cells ``{(metric,
    matcher): float}`` (NaN: no scored cell in the band)."""
    sim = pipe.cfg.similarity
    la_list, lb_list = pipe.a.layers, pipe.b.layers
    names = matchers.names(pipe)
    cal = {(m, n): np.full((len(la_list), len(lb_list)), np.nan)
           for m in sim.metrics for n in names}
    cells = {}
    todo = [(la, lb, name) for la, lb in pipe.pairs for name in names]
    for la, lb, name in tqdm(todo, desc="similarity by matcher", unit="scoring"):
        e = matcher_entry(pipe, la, lb, name)
        if e is None:
            continue
        cells[la, lb, name] = load(e)["metrics"]
        for metric, r in cells[la, lb, name].items():
            if "observed" in r:
                cal[metric, name][la_list.index(la), lb_list.index(lb)] = r["calibrated"]
    depth_a = [pipe.a.depth(la) for la in la_list]
    depth_b = [pipe.b.depth(lb) for lb in lb_list]
    return cells, {k: band_mean(g, depth_a, depth_b, sim.band) for k, g in cal.items()}


def log_by_matcher(pipe) -> None:
    """Each metric's raw and calibrated score under every matcher, per layer pair (the table
    ``by_matcher_cells.json``: ``<metric>_by_<matcher>``, ``<metric>_cal_by_<matcher>``),
    and the mean calibrated score of the middle-band cells
    (``<metric>_cal_middle_by_<matcher>``)."""
    found, middle = by_matcher(pipe)
    table: dict[tuple[int, int], dict[str, float]] = {}
    for (la, lb, name), scores in found.items():
        row = table.setdefault((la, lb), {})
        for metric, r in scores.items():
            if "observed" in r:
                row[f"{metric}_by_{name}"] = r["observed"]
                row[f"{metric}_cal_by_{name}"] = r["calibrated"]
    log_cells(table, "by_matcher", pipe.cfg.tracking.per_cell_metrics)
    mlflow.log_metrics({f"{m}_cal_middle_by_{n}": v for (m, n), v in middle.items()
                        if np.isfinite(v)})
