"""The sweep's summary, logged on its parent run by the worker that closes it.

``best.json`` (the best trial, or the Pareto front of several objectives),
``trials.csv`` (every trial), counts and best values as metrics, Optuna's plots (a plot
that cannot be drawn leaves a ``.txt`` saying why: a plot is never worth the sweep) and
``summary.md``, also the run's description in the MLflow UI.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
from optuna.trial import TrialState

from ..config import Config
from .attrs import RUN_ATTR
from .spec import SweepSpec
from .study import SweepStudy

# the trial states counted as n_<state> metrics
STATES = ("COMPLETE", "FAIL", "PRUNED", "RUNNING", "WAITING")


@dataclass(frozen=True)
class Summary:
    """What the summary describes: the spec, the base config and pipeline, the study."""

    spec: SweepSpec
    cfg: Config
    pipe: Any  # the base Pipeline (for the models' names)
    study: SweepStudy

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.spec.objectives]

    def write(self) -> list[dict]:
        """Log trials.csv, best.json, the plots and summary.md on the active (parent)
        run; return the best trial (one objective) or the Pareto front as dicts."""
        study, names = self.study.study, self.names
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = self.best(len(complete))
        counts = self.study.counts()
        key = "best_trial" if len(names) == 1 else "pareto_front"
        mlflow.log_dict({"study": self.study.name,
                         "objectives": [asdict(o) for o in self.spec.objectives],
                         "n_complete": len(complete), "states": counts,
                         key: (best[0] if best else None) if len(names) == 1 else best},
                        "best.json")
        mlflow.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
        mlflow.log_metrics({f"n_{state.lower()}": counts.get(state, 0)
                            for state in STATES})
        if len(names) == 1 and best:
            mlflow.log_metrics({f"best_{names[0]}": best[0]["values"][names[0]],
                                "best_trial": best[0]["number"]})
        elif best:
            mlflow.log_metric("pareto_size", len(best))
        self.plots(len(complete))
        text = self.text(best, counts)
        mlflow.log_text(text, "summary.md")
        mlflow.set_tag("mlflow.note.content", text)
        return best

    def best(self, n_complete: int) -> list[dict]:
        """The best trial (one objective) or the Pareto front sorted by trial number,
        as dicts; empty when no trial is COMPLETE."""
        names, study = self.names, self.study.study

        def describe(t) -> dict:
            return {"number": t.number, "values": dict(zip(names, t.values)),
                    "params": t.params, "mlflow_run_id": t.user_attrs.get(RUN_ATTR)}

        if not n_complete:
            return []
        if len(names) == 1:
            return [describe(study.best_trial)]
        return sorted((describe(t) for t in study.best_trials),
                      key=lambda d: d["number"])

    def plots(self, n_complete: int) -> None:
        """Optimisation history, parameter importances and parallel coordinates per
        objective (suffixed by its name when there are several), and the Pareto front.
        """
        import matplotlib

        matplotlib.use("Agg")  # workers have no display; before anything imports pyplot
        from optuna.visualization import matplotlib as ovm

        study, names = self.study.study, self.names
        single = len(names) == 1
        for i, name in enumerate(names):
            suffix = "" if single else f"_{name}"
            kwargs = {"target": None if single else (lambda t, i=i: t.values[i]),
                      "target_name": name}
            for plot, draw in (("optimization_history", ovm.plot_optimization_history),
                               ("param_importances", ovm.plot_param_importances),
                               ("parallel_coordinate", ovm.plot_parallel_coordinate)):
                log_plot(f"{plot}{suffix}.png", n_complete,
                         lambda draw=draw, kwargs=kwargs: draw(study, **kwargs))
        if not single:
            log_plot("pareto_front.png", n_complete,
                     lambda: ovm.plot_pareto_front(study, target_names=names))

    def text(self, best: list[dict], counts: dict) -> str:
        """``summary.md``: the setup in a few lines, then the best trial or the Pareto
        front."""
        s, pipe, cfg = self.spec, self.pipe, self.cfg
        lines = [f"# Sweep {self.study.name!r} ({s.name})", "",
                 (f"- base config: {cfg.name} ({pipe.a.model_name} vs {pipe.b.model_name}), "
                  f"{cfg.extract.n_tokens:,} extracted tokens"),
                 f"- storage: {self.study.storage.url}",
                 f"- sampler: {s.sampler.name}, seed {s.sampler.seed}",
                 "- objectives: " + ", ".join(
                     f"{o.name} ({o.direction}: mean {o.metric}"
                     + ("" if o.metric == "n_pairs" else f" {o.field}")
                     + f" over {o.layers} layer pairs)" for o in s.objectives),
                 "- trials: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                 + f" (target {self.study.n_trials} COMPLETE)", ""]
        if not best:
            lines.append("No trial completed.")
            return "\n".join(lines) + "\n"
        lines += ["## Best trial" if len(best) == 1 else
                  f"## Pareto front ({len(best)} trials)", "",
                  "| trial | " + " | ".join(o.name for o in s.objectives) + " | "
                  + " | ".join(p.path for p in s.params) + " |",
                  "|---" * (1 + len(s.objectives) + len(s.params)) + "|"]
        for b in best:
            vals = [f"{b['values'][o.name]:.4g}" for o in s.objectives]
            pars = [fmt(b["params"].get(p.path)) for p in s.params]
            lines.append(f"| {b['number']} | " + " | ".join(vals + pars) + " |")
        return "\n".join(lines) + "\n"


def log_plot(filename: str, n_complete: int, draw) -> None:
    """Log the figure ``draw()`` makes (it returns the Axes, or an array of them) as
    ``filename``; if it fails, log ``<name>.txt`` with the reason instead."""
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = draw()
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        fig = first.figure
        mlflow.log_figure(fig, filename)
        plt.close(fig)
    except Exception as err:  # noqa: BLE001 - a plot is never worth the sweep
        note = filename.rsplit(".", 1)[0] + ".txt"
        mlflow.log_text(f"{filename} was not drawn ({n_complete} complete trials): "
                        f"{type(err).__name__}: {err}\n", note)
        plt.close("all")


def fmt(v) -> str:
    """A parameter value for the summary table: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
