"""The ``convergence`` stage: read the grid of scores as a whole, against chance, a ceiling
and a floor.

Inputs: every layer pair's ``scores`` (``stages.similarity``: the calibrated score, its
interval and its null draws, the same seeded draws in every layer pair) and, with
``similarity.ceiling`` / ``similarity.control``, the scores of the controls
(``saeuniv.controls``), built through the store like the main pipeline's.

Per metric it computes
- the grid tests (``saeuniv.core.metrics``): the best cell against the best cell of each
  null grid, and the middle-band and depth-diagonal contrasts of calibrated scores, each
  with the null grids' p and the layer-relabelling p;
- the ceiling of each side and layer (its SAE against a twin, calibrated), the floor of
  each layer pair (A against a random-init B, calibrated; 0, the calibrated null, without
  the control) and the convergence index of each layer pair with its interval.

Logged: the headline (``HEADLINE``, e.g. ``svcca_cal_middle``); per layer pair
``<metric>_index`` (with ``_index_lo``/``_index_hi``) and ``<metric>_floor``, as rows of the
table ``convergence_cells.json`` (``saeuniv.cells``); each side's ceiling as the curves
``<metric>_ceiling_a`` and ``<metric>_ceiling_b`` with step = layer; ``convergence.json``.
"""

from __future__ import annotations

import itertools
import math

import mlflow
import numpy as np
from tqdm.auto import tqdm

from ..cells import log_cells
from ..controls import floor_config, twin_config
from ..core import metrics
from ..core.depth import band_mean
from ..pipeline import Pipeline
from ..tracking import pair_key, warn
from . import similarity

# the run's top-level numbers per metric, e.g. ``svcca_cal_middle``; what each one is
HEADLINE = {
    "raw_middle": "mean raw score of the middle-band cells",
    "cal_middle": "mean calibrated score of the middle-band cells",
    "middle_contrast": "middle band minus the rest, calibrated",
    "middle_p": "p of the middle contrast against the null grids",
    "middle_p_layers": "p of the middle contrast against random layer orders",
    "diagonal_contrast": "matched relative depth minus the rest, calibrated",
    "diagonal_p": "p of the diagonal contrast against the null grids",
    "diagonal_p_layers": "p of the diagonal contrast against random layer orders",
    "best_cell_p": "family-wise p of the best calibrated cell",
    "index_median": "median convergence index over the scored layer pairs",
    "ceiling_fraction": "middle-band calibrated score over the middle-band ceiling",
}
CELL_FIELDS = ("index", "index_lo", "index_hi", "floor")  # logged per layer pair


def grids(pipe) -> dict[str, dict]:
    """Per metric of ``similarity.metrics``, its grid over ``pipe.a.layers`` x
    ``pipe.b.layers``: raw, tau and calibrated scores (La, Lb), the calibrated null grids
    (K, La, Lb) and the raw intervals (La, Lb, 2); NaN where a layer pair is not compared or
    not scored. Each layer pair's scores and null draws are read once."""
    sim = pipe.cfg.similarity
    la_list, lb_list = pipe.a.layers, pipe.b.layers
    shape = (len(la_list), len(lb_list))
    out = {}
    for name in sim.metrics:
        out[name] = {f: np.full(shape, np.nan) for f in ("observed", "tau", "calibrated")}
        out[name]["null"] = np.full((sim.n_perm, *shape), np.nan)
        out[name]["interval"] = np.full((*shape, 2), np.nan)
    for la, lb in pipe.pairs:
        i, j = la_list.index(la), lb_list.index(lb)
        e = similarity.entry(pipe, la, lb)
        scores, nulls = similarity.load(e)["metrics"], similarity.load_nulls(e)
        for name, g in out.items():
            r = scores.get(name, {})
            if "observed" not in r:
                continue
            for f in ("observed", "tau", "calibrated"):
                g[f][i, j] = r[f]
            g["null"][:, i, j] = metrics.calibrate_scores(nulls[name], r["tau"], sim.s_max)
            if r.get("interval"):
                g["interval"][i, j] = r["interval"]
    return out


def tests(pipe, g: dict) -> dict:
    """The grid tests of one metric's grid ``g``: ``best_cell``, ``middle`` and
    ``diagonal``, each a dict of the test's numbers or ``{"error": why}``."""
    sim = pipe.cfg.similarity
    depth_a = [pipe.a.depth(la) for la in pipe.a.layers]
    depth_b = [pipe.b.depth(lb) for lb in pipe.b.layers]
    out = {}
    for kind in ("best_cell", *metrics.KINDS):
        try:
            r = (metrics.max_cell(g["calibrated"], g["null"]) if kind == "best_cell" else
                 metrics.depth_contrast(g["calibrated"], g["null"], depth_a, depth_b,
                                        sim.band, kind, seed=sim.seed))
        except ValueError as err:  # e.g. pairs: depth leaves no off-diagonal cell
            out[kind] = {"error": str(err)}
            continue
        out[kind] = {"statistic": r.statistic, "null_mean": r.null_mean, "z": r.z, "p": r.p,
                     "p_layers": r.p_layers}
    return out


def ceilings(pipe) -> dict[str, dict | str]:
    """Side -> metric -> layer -> calibrated score of the side's SAE against its twin, or
    side -> why there is none."""
    out: dict[str, dict | str] = {}
    for side in pipe.sides:
        cfg = twin_config(pipe.cfg, side.name, side.used_layers)
        if cfg is None:
            out[side.name] = (f"no twin for the pretrained sae_{side.name}: set "
                              f"sae_{side.name}.twin (another SAE id or folder of the same "
                              "layers) for a ceiling")
            continue
        twin = Pipeline(cfg, pipe.store, models=pipe.up.models)  # the run's models, not reloaded
        twin.validate()
        out[side.name] = {name: {} for name in pipe.cfg.similarity.metrics}
        for layer in tqdm(side.used_layers, desc=f"ceiling {side.label}", unit="layer"):
            scores = similarity.load(similarity.entry(twin, layer, layer))
            for name in pipe.cfg.similarity.metrics:
                out[side.name][name][layer] = scores["metrics"].get(name, {}).get(
                    "calibrated", math.nan)
    return out


def floors(pipe) -> dict[str, dict[str, float]]:
    """Metric -> ``aI-bJ`` -> calibrated score of A against a random-init B.

    The run's own models are released first: the control reads A's codes from the store and
    loads only the random-init B, so no more than the run's two models are held at once."""
    pipe.up.release()
    control = Pipeline(floor_config(pipe.cfg), pipe.store)
    control.validate()
    out = {name: {} for name in pipe.cfg.similarity.metrics}
    for la, lb in tqdm(control.pairs, desc="floor (random-init B)", unit="layer pair"):
        scores = similarity.load(similarity.entry(control, la, lb))
        for name in out:
            out[name][pair_key(la, lb)] = scores["metrics"].get(name, {}).get(
                "calibrated", math.nan)
    control.up.release()
    return out


def index_grids(pipe, g: dict, ceiling: dict, floor: dict | None, name: str) -> dict:
    """Ceiling, floor, convergence index and its interval (La, Lb) of one metric."""
    sim = pipe.cfg.similarity
    la_list, lb_list = pipe.a.layers, pipe.b.layers
    shape = g["calibrated"].shape
    side_ceiling = {side: np.array([ceiling[side][name].get(layer, math.nan)
                                    if isinstance(ceiling.get(side), dict) else math.nan
                                    for layer in layers])
                    for side, layers in (("a", la_list), ("b", lb_list))}
    cell_ceiling = metrics.pair_ceiling(side_ceiling["a"][:, None], side_ceiling["b"][None, :])
    cell_floor = np.zeros(shape)
    if floor is not None:
        cell_floor = np.array([[floor[name].get(pair_key(la, lb), math.nan) for lb in lb_list]
                               for la in la_list])
    cell_floor[np.isnan(g["calibrated"])] = np.nan
    ends = metrics.calibrate_scores(g["interval"], g["tau"][..., None], sim.s_max)
    return {"ceiling": cell_ceiling, "floor": cell_floor,
            "index": metrics.convergence_index(g["calibrated"], cell_floor, cell_ceiling),
            "index_lo": metrics.convergence_index(ends[..., 0], cell_floor, cell_ceiling),
            "index_hi": metrics.convergence_index(ends[..., 1], cell_floor, cell_ceiling),
            "ceiling_a": side_ceiling["a"], "ceiling_b": side_ceiling["b"]}


def headline(pipe, g: dict, t: dict, idx: dict) -> dict[str, float]:
    """The numbers of ``HEADLINE`` for one metric (nan where not available)."""
    band = pipe.cfg.similarity.band
    depth_a = [pipe.a.depth(la) for la in pipe.a.layers]
    depth_b = [pipe.b.depth(lb) for lb in pipe.b.layers]

    def mean_in_band(values):
        return band_mean(values, depth_a, depth_b, band)

    out = {"raw_middle": mean_in_band(g["observed"]), "cal_middle": mean_in_band(g["calibrated"])}
    for kind in metrics.KINDS:
        r = t[kind]
        out[f"{kind}_contrast"] = r.get("statistic", math.nan)
        out[f"{kind}_p"] = r.get("p", math.nan)
        out[f"{kind}_p_layers"] = r.get("p_layers", math.nan)
    out["best_cell_p"] = t["best_cell"].get("p", math.nan)
    finite = idx["index"][np.isfinite(idx["index"])]
    out["index_median"] = float(np.median(finite)) if finite.size else math.nan
    ceiling_middle = mean_in_band(np.where(np.isnan(g["calibrated"]), np.nan, idx["ceiling"]))
    out["ceiling_fraction"] = (out["cal_middle"] / ceiling_middle
                               if ceiling_middle > 0 else math.nan)
    return out


def results(pipe) -> dict:
    """Everything the stage computes, per metric: ``grid``, ``tests``, ``index`` and
    ``headline`` (arrays over ``pipe.a.layers`` x ``pipe.b.layers``), plus what was left
    out (``notes``)."""
    sim = pipe.cfg.similarity
    ceiling = ceilings(pipe) if sim.ceiling else {}
    floor = floors(pipe) if sim.control else None
    notes = [why for why in ceiling.values() if isinstance(why, str)]
    if not sim.ceiling:
        notes.append("no ceiling (similarity.ceiling: false): no convergence index")
    if floor is None:
        notes.append("floor: the calibrated null (0); no random-init control "
                     "(similarity.control: false)")
    out = {"notes": notes, "metrics": {}}
    for name, g in grids(pipe).items():
        t = tests(pipe, g)
        idx = index_grids(pipe, g, ceiling, floor, name)
        out["metrics"][name] = {"grid": g, "tests": t, "index": idx,
                                "headline": headline(pipe, g, t, idx)}
    return out


def headline_metrics(res: dict) -> dict[str, float]:
    """``<metric>_<headline key>`` -> value, finite values only."""
    return {f"{name}_{k}": v for name, r in res["metrics"].items()
            for k, v in r["headline"].items() if np.isfinite(v)}


def log(pipe, res: dict) -> None:
    """Log the headline, the per-layer-pair index and floors (the table
    ``convergence_cells.json``) and each side's ceilings (curves with step = layer)."""
    mlflow.log_metrics(headline_metrics(res))
    cells: dict[tuple[int, int], dict[str, float]] = {}
    for name, r in res["metrics"].items():
        idx = r["index"]
        for (i, la), (j, lb) in itertools.product(enumerate(pipe.a.layers),
                                                  enumerate(pipe.b.layers)):
            for field in CELL_FIELDS:
                if np.isfinite(idx[field][i, j]):
                    cells.setdefault((la, lb), {})[f"{name}_{field}"] = idx[field][i, j]
        for side, layers in (("a", pipe.a.layers), ("b", pipe.b.layers)):
            for layer, value in zip(layers, idx[f"ceiling_{side}"]):
                if np.isfinite(value):
                    mlflow.log_metric(f"{name}_ceiling_{side}", value, step=layer)
        for kind, t in r["tests"].items():
            if "error" in t:
                warn(f"convergence.{name}.{kind}", t["error"])
    for i, note in enumerate(res["notes"]):
        warn(f"convergence.note{i}", note)
    log_cells(cells, "convergence", pipe.cfg.tracking.per_cell_metrics)
    mlflow.log_dict(as_json(res), "convergence.json")


def as_json(res: dict) -> dict:
    """``results`` without the null grids, arrays as lists and NaN as None."""
    from ..report import nan_to_none

    return nan_to_none({"notes": res["notes"], "metrics": {
        name: {"grid": {k: v for k, v in r["grid"].items() if k != "null"},
               "tests": r["tests"], "index": r["index"], "headline": r["headline"]}
        for name, r in res["metrics"].items()}})


def run(pipe) -> None:
    log(pipe, results(pipe))
