"""The driver: the whole pipeline as one parent MLflow run with a nested run per stage, then
the parent's report (like MLflow's multistep example, one stage after the other).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import mlflow

from . import stages
from .config import Config
from .lineage import log_corpus, pipeline_lineage
from .pipeline import Pipeline
from .report import report
from .stages.runner import run_stage
from .store import Store
from .tracking import stage_run


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as flat MLflow params: ``match.threshold`` -> ``"0.1"``, lists as JSON."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, (list, dict)) else str(node)

    walk("", cfg.to_dict())
    return out


def run_main(cfg: Config, store: Store | None = None, launcher: Callable | None = None,
             force: bool = False, pipe: Pipeline | None = None) -> str:
    """Run every stage of ``stages.STAGES`` as a nested child of one ``main`` run, then log
    the report; returns the main run's id.

    ``launcher(stage, pipe)`` runs a stage; by default in this process (``run_stage``,
    reusing a finished stage run with the same inputs unless ``force``). ``pipe`` is
    ``cfg``'s pipeline when the caller already holds one (a ladder).
    """
    pipe = pipe or Pipeline(cfg, store)
    if force:  # every entry recomputed once, from the corpus on
        pipe.store.force |= {kind for stage in stages.STAGES for kind in stage.kinds}
    launch = launcher or (lambda stage, p: run_stage(stage, p, force=force))
    if launcher is None:  # every stage in this process: executors may build units ahead
        pipe.ahead = stages.NAMES
    with stage_run("main", run_name=cfg.label(), tags=pipeline_lineage(pipe)) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(cfg.to_dict(), "config.yaml")
        pipe.validate()
        mlflow.set_tags(pipeline_lineage(pipe))
        for stage in stages.NAMES:
            launch(stage, pipe)
        report(pipe)
        mlflow.set_tags(pipeline_lineage(pipe))
        log_corpus(pipe, resolve=True)  # even when every stage run was reused
        return run.info.run_id
