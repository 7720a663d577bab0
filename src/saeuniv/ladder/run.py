"""Run a ladder: one parent ``ladder`` run, a child ``main`` run per pair, then the trend.

Every pair's config is checked (layers, SAE sources against each model's width, the token
budget, disk space) before any model is trained or run. The pairs share one store, so a
model's extraction and SAEs are made by the first pair that needs them and read back by
the others; no model runs twice.

Logged on the parent: ``ladder.yaml``; per pair and metric ``<metric>_middle/<A>-vs-<B>``
and ``<metric>_middle_null_mean/<A>-vs-<B>``; ``ladder_scores.csv``; the figures
``trend_param_ratio.png``, ``trend_smaller_size.png`` and ``matrix_<metric>.png``;
``summary.md`` (also the run's description).
"""

from __future__ import annotations

import mlflow
from tqdm.auto import tqdm

from ..config import ConfigError
from ..main import run_main
from ..pipeline import Pipeline
from ..store import Store
from ..tracking import csv_text, metric_name, stage_run
from . import trend
from .spec import Ladder


def run_ladder(ladder: Ladder, store: Store | None = None, force: bool = False) -> str:
    """Run every pair of ``ladder`` as a child main run of one ``ladder`` run and log the
    trend; returns the ladder run's id."""
    store = store or Store()
    pipes = {(i, j): Pipeline(ladder.config(i, j), store) for i, j in ladder.pairs()}
    labels = [r.label for r in ladder.rungs]
    with stage_run("ladder", run_name=f"ladder:{ladder.name}") as run:
        mlflow.log_params({"ladder.pairs": ladder.pairing, "ladder.n_models": len(labels),
                           "ladder.models": ", ".join(labels)})
        mlflow.log_dict(ladder.to_dict(), "ladder.yaml")
        for (i, j), pipe in pipes.items():  # every pair checked before any work
            try:
                pipe.validate()
            except ValueError as err:
                raise ConfigError(f"ladder pair {labels[i]} (A) vs {labels[j]} (B): {err}") \
                    from None
        children = {}
        for (i, j), pipe in tqdm(pipes.items(), desc=f"ladder {ladder.name}", unit="pair"):
            children[(i, j)] = run_main(pipe.cfg, store, force=force, pipe=pipe)
            pipe.up.release()  # one pair's models in memory at a time
        mlflow.set_tags({f"saeuniv.ladder.{labels[i]}-vs-{labels[j]}": run_id
                         for (i, j), run_id in children.items()})
        params = model_params(ladder, pipes)
        rows = [row for (i, j), pipe in pipes.items() for row in trend.pair_rows(
            pipe, (labels[i], labels[j]), (params[i], params[j]))]
        log_trend(rows, labels, ladder)
        return run.info.run_id


def model_params(ladder: Ladder, pipes: dict) -> list[int]:
    """Each model's parameter count: given in the ladder file, or counted when the built-in
    family trained it."""
    out = []
    for k, rung in enumerate(ladder.rungs):
        if rung.params is not None:
            out.append(rung.params)
            continue
        (i, _), pipe = next(((i, j), p) for (i, j), p in pipes.items() if k in (i, j))
        out.append(int((pipe.a if i == k else pipe.b).model_entry.meta["params"]))
    return out


def log_trend(rows: list[dict], labels: list[str], ladder: Ladder) -> None:
    from ..plots import model_matrix, plt
    from ..plots import trend as trend_plot

    mlflow.log_metrics({
        metric_name(f"{r['metric']}_middle{suffix}/{r['model_a']}-vs-{r['model_b']}"): r[key]
        for r in rows for suffix, key in (("", "middle_score"), ("_null_mean", "null_mean"),
                                          ("_cal", "middle_calibrated"))
        if r[key] == r[key]})  # NaN: no scored cell in the middle band
    mlflow.log_text(csv_text(rows), "ladder_scores.csv")
    for x, name, xlabel in (("param_ratio", "trend_param_ratio.png",
                             "parameter ratio (larger / smaller)"),
                            ("params_a", "trend_smaller_size.png",
                             "parameters of the smaller model")):
        fig = trend_plot(trend.series(rows, x), f"ladder {ladder.name}: middle-band score "
                         "per pair", xlabel, "middle-band score")
        mlflow.log_figure(fig, name)
        plt.close(fig)
    for metric in dict.fromkeys(r["metric"] for r in rows):
        fig = model_matrix(trend.matrix(rows, labels, metric), labels,
                           f"{metric}: middle-band score (row: smaller model)")
        mlflow.log_figure(fig, f"matrix_{metric}.png")
        plt.close(fig)
    text = summary(rows, ladder)
    mlflow.log_text(text, "summary.md")
    mlflow.set_tag("mlflow.note.content", text)


def summary(rows: list[dict], ladder: Ladder) -> str:
    """The ladder's table in Markdown: per pair and metric, the middle-band score and its
    null."""
    lines = [f"# Ladder {ladder.name}: {len(ladder.rungs)} models, {ladder.pairing} pairs", "",
             "Middle-band score: the mean raw score over the cells whose two layers both sit "
             "at relative depth 1/3 to 2/3; null: the same mean of the cells' permutation-null "
             "means (sd averaged likewise). Raw scores are not calibrated: their nulls differ "
             "from cell to cell and pair to pair, so read each score against its own null. "
             "Calibrated: the band's mean calibrated score (0: not above each cell's chance "
             "threshold), comparable across pairs; each pair's own run tests its contrasts.",
             *(["", f"**Caveats.** {' '.join(ladder.base.caveats)}"] if ladder.base.caveats
               else []),
             "", "| A | B | params B/A | metric | middle-band score | null mean ± 2 sd | "
             "calibrated | cells |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model_a']} | {r['model_b']} | {r['param_ratio']:.2f} | "
                     f"{r['metric']} | {r['middle_score']:.3f} | {r['null_mean']:.3f} ± "
                     f"{2 * r['null_sd']:.3f} | {r['middle_calibrated']:.3f} | "
                     f"{r['middle_cells']} |")
    return "\n".join(lines) + "\n"
