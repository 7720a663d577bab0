"""Running one stage in its own MLflow run, and reusing a finished run with the same inputs.

Each stage run carries ``saeuniv.inputs_hash``: a digest of the config sections the stage
depends on (``stages.sections``), of any file the stage reads by name (the subspaces
stage's concept set, by content), and of the code (``saeuniv.code_version``). Before a
stage runs, the latest FINISHED run of that stage in the experiment with the same inputs
hash is looked up; when its artefacts still match its ``artifacts.sha256.json``, its
metrics, artefacts and ``saeuniv.*`` tags are copied into the new run instead of computing
anything.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow

from ..config import Config, digest
from ..executors import prebuild
from ..lineage import log_corpus, pipeline_lineage
from ..tracking import CHECKSUMS, code_version, stage_run
from . import get, sections

log = logging.getLogger(__name__)


def inputs_hash(cfg: Config, stage: str) -> str:
    """Digest of what a stage's result depends on: its config sections and the code."""
    data = cfg.to_dict()
    spec = {"stage": stage, "config": {k: data[k] for k in sections(stage)},
            "code": code_version()}
    extra = getattr(get(stage).module, "extra_inputs", None)
    if extra is not None:
        spec.update(extra(cfg))
    return digest(spec)


def reusable_run(stage: str, inputs: str):
    """The latest FINISHED run of ``stage`` with these inputs whose artefacts are intact
    (checked against its ``artifacts.sha256.json``), in the active run's experiment."""
    from ..audit import audit

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    found = client.search_runs(
        [active.info.experiment_id],
        filter_string=(f"tags.saeuniv.inputs_hash = '{inputs}' and tags.saeuniv.stage = "
                       f"'{stage}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in found:
        if run.info.run_id == active.info.run_id:
            continue
        result = audit(run.info.run_id)
        if result.intact:
            return run
        log.warning("not reusing %s run %s: %s", stage, run.info.run_id,
                    "; ".join(result.problems))
    return None


def reuse_run(source) -> None:
    """Copy a finished run's metrics (every step), artefacts and stage tags into the
    active run and tag ``saeuniv.reused_from``."""
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    history = [Metric(m.key, m.value, m.timestamp, m.step) for key in source.data.metrics
               for m in client.get_metric_history(source.info.run_id, key)]
    for i in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[i:i + 1000])
    own = mlflow.get_run(run_id).data.tags
    mlflow.set_tags({k: v for k, v in source.data.tags.items()
                     if k.startswith("saeuniv.") and k not in own
                     and k not in ("saeuniv.reused_from", "saeuniv.error")})
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(source.info.run_id, "", tmp))
        (local / CHECKSUMS).unlink(missing_ok=True)
        if any(local.iterdir()):
            mlflow.log_artifacts(str(local))
    mlflow.set_tag("saeuniv.reused_from", source.info.run_id)


def stage_run_name(stage: str, cfg: Config) -> str:
    """The run name of a stage: the stage, then what tells the pipeline from another."""
    return f"{stage} · {cfg.label()}"


def run_stage(stage: str, pipe, force: bool = False) -> None:
    """Run one stage inside its own MLflow run (nested when a parent is active).

    The pipeline is validated first (``Pipeline.validate``), so bad input fails the run in
    seconds. A FINISHED run of the same stage with the same ``saeuniv.inputs_hash`` and
    intact artefacts is reused (its metrics, artefacts and tags copied,
    ``saeuniv.reused_from`` set) instead of recomputing. ``force`` recomputes: no reuse, and
    the stage's store entries are rebuilt and overwritten.
    """
    inputs = inputs_hash(pipe.cfg, stage)
    with stage_run(stage, run_name=stage_run_name(stage, pipe.cfg),
                   tags={**pipeline_lineage(pipe), "saeuniv.inputs_hash": inputs}):
        mlflow.log_params({"config_name": pipe.cfg.name, "config_hash": pipe.cfg.hash()})
        pipe.validate(stage)
        source = None if force else reusable_run(stage, inputs)
        if source is not None:
            log.info("stage %s: reusing run %s (same inputs and code)", stage,
                     source.info.run_id)
            reuse_run(source)
            log_corpus(pipe)
            return
        if force:
            pipe.store.force |= set(get(stage).kinds)
        prebuild(stage, pipe)
        get(stage).run(pipe)
        mlflow.set_tags(pipeline_lineage(pipe))  # the keys this stage resolved
        log_corpus(pipe)
