"""The ``main`` run's report: every layer pair's scores, the layer-by-layer grids, the
per-layer curves, the matched pairs, the summary and one self-contained ``report.html``.

Logged on the active (``main``) run: the ``convergence`` stage's headline numbers (per
metric, e.g. ``svcca_cal_middle``, ``svcca_middle_p``; ``stages.convergence.HEADLINE``);
per metric the curve ``<metric>``, ``<metric>_null_mean``, ``<metric>_z`` and ``<metric>_p``
with step = A layer, each A layer scored against the B layer at the nearest relative depth,
and each side's ceiling curve; SAE quality per layer (as the ``extract`` stage logs it);
each layer pair's scores and convergence index as the tables ``scores_cells.json`` and
``convergence_cells.json`` (``saeuniv.cells``; also as metric keys with
``tracking.per_cell_metrics``); ``grids.json``,
``convergence.json``, ``heatmap_<metric>.png`` (raw), ``heatmap_<metric>_cal.png``
(calibrated), ``heatmap_<metric>_index.png`` (convergence index), ``depth_curves.png``,
``matched_pairs.csv``, ``summary.md`` (also the run's description) and ``report.html``.
"""

from __future__ import annotations

import mlflow
import numpy as np

from . import saes
from .core.significance import ALPHA
from .stages import convergence, extract, match, similarity
from .stages.subspaces import main_summary_lines
from .tracking import csv_text, pair_key

GRID_FIELDS = ("observed", "null_mean", "null_sd", "z", "p", "calibrated")
CURVE_FIELDS = ("null_mean", "z", "p")  # logged beside each curve point
# matched pairs per layer pair in report.html's browser: at least 5, at most 50, about
# 5,000 in all (a large grid's page stays light; every pair is in matched_pairs.csv)
REPORT_PAIRS = (5, 50, 5000)


def grids(pipe) -> dict:
    """metric -> field -> (n_a, n_b) arrays from the stored scores, the pairs kept per layer
    pair (-1: not compared) and why a pair or metric has no score (``problems``)."""
    la_list, lb_list = pipe.a.layers, pipe.b.layers
    shape = (len(la_list), len(lb_list))
    out: dict = {"layers_a": la_list, "layers_b": lb_list, "n_pairs": [], "metrics": {
        name: {f: np.full(shape, np.nan) for f in GRID_FIELDS}
        for name in pipe.cfg.similarity.metrics}}
    n_pairs = np.full(shape, -1, dtype=int)
    problems = {}
    for la, lb in pipe.pairs:
        i, j = la_list.index(la), lb_list.index(lb)
        s = similarity.load(similarity.entry(pipe, la, lb))
        n_pairs[i, j] = s["n_pairs"]
        why = [s["status"]] if s.get("status", "ok") != "ok" else []
        for name, r in s["metrics"].items():
            if "error" in r:
                why.append(f"{name}: {r['error']}")
            for f in GRID_FIELDS:
                if f in r and r[f] is not None:
                    out["metrics"][name][f][i, j] = r[f]
        if why:
            problems[pair_key(la, lb)] = "; ".join(why)
    out["n_pairs"] = n_pairs
    out["problems"] = problems
    return out


def nan_to_none(x):
    """Arrays as lists and NaN/inf as None, for JSON."""
    if isinstance(x, np.ndarray):
        return [nan_to_none(v) for v in x.tolist()]
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def depth_curve(pipe, name: str, fields: dict) -> tuple[np.ndarray, ...]:
    """Metric ``name`` of each A layer against the B layer at the nearest relative depth:
    (relative depth, score, null mean, null sd), and the curve logged with step = A layer."""
    la_list, lb_list = pipe.a.layers, pipe.b.layers
    xs, ys, ms, sds = [], [], [], []
    for i, la in enumerate(la_list):
        j = lb_list.index(pipe.nearest_b(la))
        obs = fields["observed"][i, j]
        if np.isfinite(obs):
            mlflow.log_metrics({name: obs, **{f"{name}_{f}": fields[f][i, j]
                                              for f in CURVE_FIELDS}}, step=la)
        xs.append(pipe.a.depth(la))
        ys.append(obs)
        ms.append(fields["null_mean"][i, j])
        sds.append(fields["null_sd"][i, j])
    return tuple(np.asarray(v, float) for v in (xs, ys, ms, sds))


def figures(pipe, g: dict, conv: dict) -> tuple[dict[str, str], str]:
    """Log the heatmaps (raw, calibrated, convergence index) and the per-layer curves;
    returns them as base64 PNGs for the page (title -> heatmap, curves)."""
    from .htmlreport import png_base64
    from .plots import depth_curves, heatmap, plt

    name_a, name_b = pipe.a.model_name, pipe.b.model_name
    sim = pipe.cfg.similarity
    images, curves = {}, {}
    for name, fields in g["metrics"].items():
        curves[name] = depth_curve(pipe, name, fields)
        panels = {name: (fields["observed"], f"{name}: {name_a} vs {name_b} "
                         f"(n_perm={sim.n_perm})", fields["p"]),
                  f"{name}_cal": (fields["calibrated"], f"{name}, calibrated (0: not above "
                                  f"chance at alpha={sim.alpha})", None)}
        index = conv["metrics"][name]["index"]["index"]
        if np.any(np.isfinite(index)):
            panels[f"{name}_index"] = (index, f"{name}, convergence index (0: floor, "
                                       "1: twin-SAE ceiling)", None)
        for key, (values, title, pvalues) in panels.items():
            fig = heatmap(values, g["layers_a"], g["layers_b"], title, name_a, name_b,
                          pvalues=pvalues, alpha=ALPHA)
            mlflow.log_figure(fig, f"heatmap_{key}.png")
            images[key] = png_base64(fig)
            plt.close(fig)
    fig = depth_curves(curves, f"{name_a} vs {name_b}, B layer at matching relative depth")
    mlflow.log_figure(fig, "depth_curves.png")
    curves_png = png_base64(fig)
    plt.close(fig)
    return images, curves_png


def report(pipe) -> None:
    """Log the report of ``pipe``'s results on the active run (see the module docstring)."""
    from .htmlreport import render

    g = grids(pipe)
    similarity.log_scores({(la, lb): similarity.load(similarity.entry(pipe, la, lb))
                           for la, lb in pipe.pairs}, pipe.cfg.tracking.per_cell_metrics)
    conv = convergence.results(pipe)
    convergence.log(pipe, conv)
    quality = extract.log_quality(pipe)
    mlflow.log_dict(nan_to_none(g), "grids.json")
    images, curves_png = figures(pipe, g, conv)
    ranked = [match.top_pairs(pipe, la, lb, match.entry(pipe, la, lb), None)
              for la, lb in pipe.pairs]  # every pair of each layer pair, best first
    mlflow.log_text(csv_text([row for rows in ranked for row in rows]), "matched_pairs.csv")
    text = summary(pipe, g, conv)
    split_rows = []
    if pipe.cfg.match.compare:
        text += "\n".join(match.compare_summary_lines(pipe, similarity.by_matcher(pipe)[1]))
        text += "\n"
        split_rows = match.splits(pipe)
    mlflow.log_text(text, "summary.md")
    mlflow.set_tag("mlflow.note.content", text)
    low, high, total = REPORT_PAIRS
    per_cell = max(low, min(high, total // max(1, len(ranked))))
    top = with_dashboards(pipe, [row for rows in ranked for row in rows[:per_cell]])
    mlflow.log_text(render(f"saeuniv: {pipe.a.model_name} vs {pipe.b.model_name}", text,
                           images, curves_png, quality, top, split_rows), "report.html")


def with_dashboards(pipe, rows: list[dict]) -> list[dict]:
    """Pair rows with each side's SAE Neuronpedia id (``neuronpedia_a``/``_b``, or None)."""
    ids = {side.name: {layer: saes.neuronpedia_id(side.sae_ref, layer) for layer in side.layers}
           for side in pipe.sides}
    return [{**r, "neuronpedia_a": ids["a"][r["layer_a"]],
             "neuronpedia_b": ids["b"][r["layer_b"]]} for r in rows]


# -- summary.md -------------------------------------------------------------------------

def _describe_model(side) -> str:
    entry, info = side.model_entry, side.info
    if entry is not None:
        return (f"{info.name} ({entry.meta['params']:,} params, val loss "
                f"{entry.meta['val_loss']:.3f})")
    return (f"{info.name} ({side.ref.source}, {info.n_layers} layers x {info.d_model}, "
            f"{side.ref.dtype})")


def _describe_saes(side) -> str:
    ref, s = side.sae_ref, side.cfg.sae
    if ref.source == "train":
        return f"trained here ({s.architecture}, {s.expansion}x)"
    return f"{ref.release} {ref.id}" if ref.source == "release" else ref.path


def _header(pipe) -> list[str]:
    cfg = pipe.cfg
    shared = ("one tokenizer" if pipe.up.shared_tokenizer
              else "two tokenizers, compared on shared token boundaries")
    return [f"# saeuniv: {pipe.a.model_name} vs {pipe.b.model_name}", "",
            f"- models: {_describe_model(pipe.a)} vs {_describe_model(pipe.b)}",
            f"- corpus: {cfg.corpus.source}, "
            f"{pipe.up.windows_entry.meta['n_valid_tokens']:,} analysis tokens (pad/BOS "
            f"dropped; {shared})",
            f"- SAEs: A {_describe_saes(pipe.a)}; B {_describe_saes(pipe.b)}",
            f"- matching: {cfg.match.policy}, threshold {cfg.match.threshold}, junk filter "
            f"{cfg.match.junk_filter}"
            + (f", on the first {cfg.match.n_tokens:,} tokens" if cfg.match.n_tokens else ""),
            f"- null: {cfg.similarity.n_perm} seeded permutations (seed {cfg.similarity.seed}), "
            "p = (1 + #null >= observed) / (1 + n_perm)", "",
            *([f"**Caveats.** {' '.join(cfg.caveats)}", ""] if cfg.caveats else [])]


def _metric_lines(pipe, g: dict, name: str, fields: dict) -> list[str]:
    obs = fields["observed"]
    if np.all(np.isnan(obs)):
        return [f"- {name}: no layer pair could be scored"]
    i, j = np.unravel_index(np.nanargmax(obs), obs.shape)
    lines = [f"- **{name}** best at A layer {g['layers_a'][i]} / B layer "
             f"{g['layers_b'][j]}: {obs[i, j]:.3f} (null {fields['null_mean'][i, j]:.3f}, "
             f"z {fields['z'][i, j]:.1f}, p {fields['p'][i, j]:.3g}); "
             f"{int(np.sum(fields['p'] < ALPHA))}/{int(np.sum(g['n_pairs'] >= 0))} "
             f"layer pairs have p < {ALPHA}"]
    z = fields["z"]
    if np.any(np.isfinite(z)):
        i, j = np.unravel_index(np.nanargmax(np.where(np.isfinite(z), z, -np.inf)), z.shape)
        la, lb = g["layers_a"][i], g["layers_b"][j]
        lines.append(f"  - highest z at A layer {la} / B layer {lb} (relative depth "
                     f"{pipe.a.depth(la):.2f} / {pipe.b.depth(lb):.2f}): {obs[i, j]:.3f}, "
                     f"z {z[i, j]:.1f}")
    return lines


def _convergence_lines(pipe, conv: dict) -> list[str]:
    """In words, per metric: does the middle band agree most beyond chance and beyond any
    layer order, and how much of the ceiling it reaches."""
    sim = pipe.cfg.similarity
    lo, hi = sim.band
    lines = ["", "## Calibrated: does the middle band agree most?", "",
             f"Calibrated scores are 0 at or below each layer pair's chance threshold "
             f"(alpha={sim.alpha}); the middle band is relative depth {lo:.2f}-{hi:.2f} on "
             "both sides. \"Survives\" needs both p < alpha: against the null grids (p) and "
             "against random layer orders (p_layers).", ""]
    for name, r in conv["metrics"].items():
        h, t = r["headline"], r["tests"]["middle"]
        if "error" in t:
            lines.append(f"- **{name}**: no middle-band test: {t['error']}")
            continue
        survives = t["p"] < sim.alpha and t["p_layers"] < sim.alpha
        verdict = ("middle layers agree most: **survives calibration**" if survives else
                   "middle layers agree most: **not supported** after calibration")
        line = (f"- **{name}**: {verdict}. Middle band raw {h['raw_middle']:.3f}, calibrated "
                f"{h['cal_middle']:.3f}; contrast {h['middle_contrast']:+.3f} (p "
                f"{t['p']:.3g}, p_layers {t['p_layers']:.3g})")
        d = r["tests"]["diagonal"]
        if "error" not in d:
            line += (f"; depth diagonal {h['diagonal_contrast']:+.3f} (p {d['p']:.3g}, "
                     f"p_layers {d['p_layers']:.3g})")
        if np.isfinite(h["ceiling_fraction"]):
            line += (f"; the middle band reaches {h['ceiling_fraction']:.0%} of its twin-SAE "
                     f"ceiling, median convergence index {h['index_median']:.2f}")
        lines.append(line + ".")
    lines += [f"- note: {note}" for note in conv["notes"]]
    return lines


def summary(pipe, g: dict, conv: dict) -> str:
    """``summary.md``: the setup, each metric's best and strongest layer pair, the
    calibrated reading of the grid, the concept subspaces, the pairs kept per layer pair
    and the pairs without a score."""
    lines = _header(pipe)
    for name, fields in g["metrics"].items():
        lines += _metric_lines(pipe, g, name, fields)
    lines += _convergence_lines(pipe, conv)
    lines += main_summary_lines(pipe)
    lines += ["", "## Pairs kept per layer pair", "",
              "| A \\ B | " + " | ".join(str(lb) for lb in g["layers_b"]) + " |",
              "|---" * (len(g["layers_b"]) + 1) + "|"]
    for i, la in enumerate(g["layers_a"]):
        lines.append(f"| {la} | " + " | ".join(str(v) for v in g["n_pairs"][i]) + " |")
    if g["problems"]:
        lines += ["", "## Layer pairs without a score", ""]
        lines += [f"- {key}: {why}" for key, why in g["problems"].items()]
    return "\n".join(lines) + "\n"
