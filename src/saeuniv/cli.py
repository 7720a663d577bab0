"""The ``saeuniv`` command: ``saeuniv run`` (the whole pipeline) and one subcommand per stage.

Every subcommand takes ``--config`` (a YAML file or a built-in name), ``--set
key.path=value`` overrides, and the shortcuts that the MLproject entry points
expose as typed parameters. Errors in the input are reported in one line,
with exit status 2, before any long work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from . import stages
from .config import EXECUTORS, MATCH_POLICIES, ConfigError, load_config, safe_yaml
from .costreport import add_plan_parser

SHORTCUTS = {
    # option: (config paths, type, help)
    "policy": (("match.policy",), str, f"match policy: {', '.join(MATCH_POLICIES)}"),
    "threshold": (("match.threshold",), float, "keep pairs with correlation above this"),
    "n_perm": (("similarity.n_perm", "subspaces.n_perm"), int,
               "permutations in each null (similarity and subspaces)"),
    "seed": (("similarity.seed", "subspaces.seed"), int,
             "seed of the permutation nulls (similarity and subspaces)"),
    "n_tokens": (("extract.n_tokens",), int, "analysis tokens (pad/BOS excluded)"),
    "executor": (("execution.executor",), str,
                 f"where each layer pair's work runs: {', '.join(EXECUTORS)}"),
    "workers": (("execution.workers",), int, "processes of the pool executor (0: one per CPU)"),
}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        out[key.strip()] = safe_yaml(value, f"--set {item!r}")
    return out


def _or_word(typ, word: str = "config"):
    """An argparse type that reads ``word`` as "not given" (the MLproject default)."""
    def parse(value: str):
        return None if value == word else typ(value)
    parse.__name__ = typ.__name__
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` and of every stage subcommand."""
    p.add_argument("--config", default="default",
                   help="YAML config file or built-in name (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set match.threshold=0.2")
    for name, (_, typ, text) in SHORTCUTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_or_word(typ),
                       default=None, help=f"{text} (overrides the config; 'config' "
                       "keeps the config's value)")
    _store_option(p)
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--force", action="store_true",
                   help="recompute: reuse no finished run with the same inputs, and "
                   "rebuild (overwrite) the stage's store entries")


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None,
                   help="artefact store folder (default: $SAEUNIV_HOME or ~/.cache/saeuniv)")


def _add_sweep(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="Optuna sweep over the analysis settings (a spec in sweeps/); resumes "
        "a study that exists, and joins it when other workers run it",
        description="Run, resume or join the Optuna sweep described by SPEC. Rerunning the "
        "same command continues the study; the same command on another machine with a "
        "shared --storage adds a worker.")
    sweep.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/thresholds.yaml")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the spec's base config, e.g. "
                       "--set corpus.source=/data/texts")
    sweep.add_argument("--storage", default=None,
                       help="Optuna storage: a database URL (sqlite:///optuna.db, "
                       "postgresql://user@host/db) or a journal file ending in .log "
                       "(default: optuna.db beside the MLflow SQLite database)")
    sweep.add_argument("--study", default=None, help="study name (default: the spec's)")
    sweep.add_argument("--n-trials", dest="n_trials", type=_or_word(int, "spec"), default=None,
                       help="COMPLETE trials wanted, over all workers (default: the spec's)")
    sweep.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this process is one worker; slurm: --workers workers as "
                       "one Slurm job array, on a database --storage (default: %(default)s)")
    sweep.add_argument("--workers", type=int, default=None,
                       help="workers of --executor slurm (array tasks running at once)")
    _store_option(sweep)
    sweep.add_argument("--experiment", default=None, help="MLflow experiment name")


def _add_audit_and_compare(sub) -> None:
    audit = sub.add_parser(
        "audit", help="print a run's provenance and check that its artefacts are intact",
        description="Print RUN_ID's inputs (params, lineage tags), parent and children, and "
        "each artefact with its size and SHA-256, checked against the run's "
        "artifacts.sha256.json. Exit status 0 when intact, 1 when an artefact is missing or "
        "changed (named on its own line).")
    audit.add_argument("run_id", help="MLflow run id")
    comp = sub.add_parser(
        "compare", help="line up two or more main runs: depth curves, difference heatmaps, "
        "params that differ", description="Compare main runs in a new MLflow run (tag "
        "saeuniv.stage=compare): per-layer scores against relative depth and the difference "
        "heatmap of the first two runs, for every metric they all scored, and the table of "
        "params that differ (printed, and logged as params_diff.csv).")
    comp.add_argument("runs", nargs="+", metavar="RUN_ID",
                      help="main run ids (an argument may hold several, split by spaces or "
                      "commas)")
    comp.add_argument("--experiment", default=None, help="MLflow experiment name")


def _add_ladder(sub) -> None:
    ladder = sub.add_parser(
        "ladder", help="compare N >= 3 models of one family pair by pair (a child main run "
        "per pair) and log the trend across sizes",
        description="Run every pair of the ladder file CONFIG (all pairs, or neighbours plus "
        "every model against the largest) as a child main run of one ladder run, then log "
        "each metric's middle-band score against the parameter ratio and the smaller "
        "model's size, and the models x models matrix. Each model's SAEs and codes are made "
        "once, by the first pair that needs them.")
    ladder.add_argument("config", help="ladder file (YAML), e.g. configs/ladder-tiny.yaml")
    ladder.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the config every pair shares, e.g. "
                        "--set extract.n_tokens=8000")
    _store_option(ladder)
    ladder.add_argument("--experiment", default=None, help="MLflow experiment name")
    ladder.add_argument("--force", action="store_true",
                        help="recompute every entry once (shared entries too), reusing no "
                        "finished run")


def _add_doctor(sub) -> None:
    doc = sub.add_parser(
        "doctor", help="find runs left RUNNING by a killed process and what crashes left in "
        "the store; --fix repairs them",
        description="List MLflow runs in state RUNNING whose process is gone (on this host: "
        "its process id is not alive or belongs to another process; on another host: older "
        "than --stale-after) and, in the store, temporary folders of interrupted builds, "
        "stale partial folders and entries whose files do not match their manifest. With "
        "--fix, orphaned runs are marked FAILED (tag saeuniv.error), stray pieces removed and "
        "bad entries moved aside; a finished, intact entry is never touched. Exit status 0 "
        "when nothing is (left) wrong, 1 otherwise.")
    doc.add_argument("--fix", action="store_true", help="repair what is found")
    _store_option(doc)
    doc.add_argument("--stale-after", dest="stale_after", default="24h",
                     help="a RUNNING run from another host (or with no owner recorded) is "
                     "orphaned after this long (default: %(default)s; e.g. 90s, 30m, 7d)")
    doc.add_argument("--quick", action="store_true",
                     help="check store files by size only, not by SHA-256 (large stores)")
    doc.add_argument("--older-than", dest="older_than", default="7d",
                     help="remove the shards of an interrupted extraction untouched this long "
                     "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeuniv", description="Compare the SAE features of two language models, "
        "layer by layer, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("run", help="run the whole pipeline (main)"))
    for stage in stages.STAGES:
        _common(sub.add_parser(stage.name, help=stage.help))
    _add_sweep(sub)
    _add_audit_and_compare(sub)
    _add_ladder(sub)
    _add_doctor(sub)
    add_plan_parser(sub, _store_option)
    return parser


def _config(args):
    overrides = _parse_set(args.set)
    for name, (paths, _, _) in SHORTCUTS.items():
        if getattr(args, name) is not None:
            overrides.update({path: getattr(args, name) for path in paths})
    return load_config(args.config, overrides)


def project_launcher(project_dir: Path, tmp: Path):
    """A launcher that runs each stage as its own MLflow project run (``mlflow.run``).

    Used when ``main`` was itself started by ``mlflow run``: the children are
    launched with the same env manager as the parent (``local`` unless the
    parent run's ``mlflow.project.env`` tag says otherwise).
    """
    import mlflow

    from .files import atomic_write_text
    from .stages.runner import stage_run_name

    def launch(stage, pipe):
        run = mlflow.active_run()
        env_manager = run.data.tags.get("mlflow.project.env", "local")
        cfg_path = tmp / f"{pipe.cfg.hash()[:12]}.yaml"
        atomic_write_text(cfg_path, yaml.safe_dump(pipe.cfg.to_dict()))
        params = {"config": str(cfg_path)}
        # the shortcuts only label the child run (the file decides): a value when the
        # paths of a shortcut agree, else "config"
        for name, (paths, _, _) in SHORTCUTS.items():
            values = {getattr(getattr(pipe.cfg, p.split(".")[0]), p.split(".")[1])
                      for p in paths}
            params[name] = values.pop() if len(values) == 1 else "config"
        if pipe.store.root != Path(os.environ.get("SAEUNIV_HOME", "")):
            os.environ["SAEUNIV_HOME"] = str(pipe.store.root)
        submitted = mlflow.run(str(project_dir), entry_point=stage, parameters=params,
                               env_manager=env_manager, experiment_id=run.info.experiment_id,
                               run_name=stage_run_name(stage, pipe.cfg), synchronous=False)
        try:
            submitted.wait()
        except BaseException:  # SIGTERM or Ctrl-C while the stage runs: stop the stage too
            submitted.cancel()  # (SIGTERM: it ends its own run FAILED), then fail this run
            raise
        status = submitted.get_status()
        if status != "FINISHED":
            client = mlflow.MlflowClient()
            if client.get_run(submitted.run_id).info.status == "RUNNING":  # killed outright
                client.set_tag(submitted.run_id, "saeuniv.error",
                               f"the stage process ended {status} without closing its run")
                client.set_terminated(submitted.run_id, "FAILED")
            raise RuntimeError(f"stage {stage!r} ended {status}; see its run "
                               f"{submitted.run_id}")

    return launch


def main(argv: list[str] | None = None, project_dir: Path | None = None) -> int:
    """Entry point of the ``saeuniv`` command and of the MLproject scripts."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("sae_lens", "transformer_lens", "alembic", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "sweep":
        return sweep_main(args)
    if args.command == "audit":
        return audit_main(args)
    if args.command == "compare":
        return compare_main(args)
    if args.command == "doctor":
        return doctor_main(args)
    if args.command == "ladder":
        return ladder_main(args)
    if args.command == "plan":
        return plan_command(args)
    try:
        cfg = _config(args)
        from .main import run_main
        from .pipeline import Pipeline
        from .stages.runner import run_stage
        from .store import Store
        from .tracking import browse_hint, experiment_name, install_signal_handlers, setup_tracking

        store = Store(args.store)
    except (ConfigError, OSError, RuntimeError) as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    install_signal_handlers()
    launched_by_project = "MLFLOW_RUN_ID" in os.environ and project_dir is not None
    uri = setup_tracking(args.experiment, experiment_name(cfg.name))
    try:
        if args.command == "run":
            with tempfile.TemporaryDirectory() as tmp:
                launcher = project_launcher(project_dir, Path(tmp)) if launched_by_project else None
                run_id = run_main(cfg, store, launcher, force=args.force)
            print(f"saeuniv: main run {run_id} finished; browse it with\n"
                  + browse_hint(uri, run_id))
        else:
            run_stage(args.command, Pipeline(cfg, store), force=args.force)
    except ValueError as err:  # bad input found by a stage: one clear line
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    return 0


def plan_command(args) -> int:
    from .costreport import plan_main
    from .store import Store

    try:
        overrides, root = _parse_set(args.set), Store(args.store).root
    except (ConfigError, OSError, RuntimeError) as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    return plan_main(args.config, overrides, args.gpu, args.calibrate, root / "calibration.json")


def _experiment_of(run_id: str) -> str:
    """The experiment of a run (a comparison is logged beside the first run it compares);
    ``saeuniv/compare`` when the run is not found (``compare`` then says why)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import experiment_name

    client = mlflow.MlflowClient(_tracking_uri())
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException:
        return experiment_name("compare")


def _tracking_uri() -> str:
    """Point MLflow at the tracking store without choosing (or creating) an experiment."""
    import mlflow

    from .tracking import DEFAULT_URI

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    mlflow.set_tracking_uri(uri)
    return uri


def audit_main(args) -> int:
    """``saeuniv audit RUN_ID``: 0 when intact, 1 when not, 2 when the run is unknown."""
    from mlflow.exceptions import MlflowException

    from .audit import main as audit

    uri = _tracking_uri()
    try:
        return audit(args.run_id)
    except MlflowException as err:
        print(f"saeuniv: error: run {args.run_id!r} not found in {uri}: {err.message}; check "
              "the run id and MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2


def doctor_main(args) -> int:
    """``saeuniv doctor [--fix]``: 0 when nothing is (left) wrong, 1 otherwise, 2 on bad
    input."""
    from .doctor import doctor, parse_duration
    from .store import default_root
    from .tracking import DEFAULT_URI

    try:
        stale_after, older_than = parse_duration(args.stale_after), parse_duration(
            args.older_than)
    except ValueError as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"saeuniv doctor: no MLflow database at {uri}; runs not checked")
        uri = None  # do not create an empty database just to look into it
    status, text = doctor(Path(args.store) if args.store else default_root(), uri, fix=args.fix,
                          stale_after=stale_after, older_than=older_than, quick=args.quick)
    print(text)
    return status


def compare_main(args) -> int:
    """``saeuniv compare``: 0 when the comparison run is logged, 2 on bad input."""
    from .compare import CompareError, compare, parse_run_ids
    from .tracking import browse_hint, install_signal_handlers, setup_tracking

    try:
        ids = parse_run_ids(args.runs)
    except CompareError as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    install_signal_handlers()
    uri = setup_tracking(args.experiment, _experiment_of(ids[0]))
    try:
        run_id, text = compare(ids)
    except CompareError as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(f"saeuniv: compare run {run_id} logged; browse it with\n" + browse_hint(uri, run_id))
    return 0


def ladder_main(args) -> int:
    """``saeuniv ladder``: 0 when every pair and the trend are logged, 2 on bad input."""
    try:
        from .ladder import load_ladder, run_ladder
        from .store import Store
        from .tracking import browse_hint, experiment_name, install_signal_handlers, setup_tracking

        ladder = load_ladder(args.config, _parse_set(args.set))
        store = Store(args.store)
    except (ConfigError, OSError, RuntimeError) as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    install_signal_handlers()
    uri = setup_tracking(args.experiment, experiment_name(ladder.name))
    try:
        run_id = run_ladder(ladder, store, force=args.force)
    except ValueError as err:  # bad input found before or during the pairs: one clear line
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    print(f"saeuniv: ladder run {run_id} finished ({len(ladder.pairs())} pairs); browse it "
          "with\n" + browse_hint(uri, run_id))
    return 0


def sweep_main(args) -> int:
    """``saeuniv sweep``: exit 0 when the study holds its trials, 1 when this worker
    stopped short (e.g. too many failed trials), 2 on bad input."""
    try:
        from .store import Store
        from .sweep import check_n_trials, load_spec, open_storage, run_sweep
        from .tracking import (
            DEFAULT_URI,
            browse_hint,
            experiment_name,
            install_signal_handlers,
            setup_tracking,
        )

        spec = load_spec(args.spec)
        check_n_trials(spec, args.n_trials)
        cfg = spec.config(_parse_set(args.set))
        store = Store(args.store)
        check_workers(args)
        if args.executor == "slurm":
            from .sweep.cluster import check_storage

            check_storage(args.storage)
        # the storage before MLflow's database is touched: a bad --storage changes nothing
        storage = open_storage(args.storage, os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    except (ConfigError, OSError, RuntimeError, ValueError) as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    install_signal_handlers()
    uri = setup_tracking(args.experiment, experiment_name(args.study or spec.study))
    if args.executor == "slurm":
        return sweep_on_slurm(args, spec, cfg, store, storage)
    try:
        result = run_sweep(spec, cfg, store, storage=storage, study_name=args.study,
                           n_trials=args.n_trials)
    except ValueError as err:  # bad input found on the way: one clear line
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    print(f"saeuniv: study {result.study!r} ({result.storage}): {result.n_complete} of "
          f"{result.n_trials} trials complete"
          + ("" if result.finished or not result.handed_off else
             ", the rest running on other workers")
          + f"; parent run {result.parent_run_id}; browse with\n"
          + browse_hint(uri, result.parent_run_id))
    if not (result.finished or result.handed_off):
        print(f"saeuniv: this worker stopped short: {result.stop_reason or 'see the log'}",
              file=sys.stderr)
        return 1
    return 0


def check_workers(args) -> None:
    """``--workers`` goes with ``--executor slurm``, and is at least 1 there."""
    if args.executor == "slurm" and (args.workers or 0) < 1:
        raise ConfigError(f"--executor slurm needs --workers N >= 1, got {args.workers}")
    if args.executor == "local" and args.workers is not None:
        raise ConfigError("--workers is for --executor slurm; for more workers on this "
                          "machine, start the same command again (with a database --storage)")


def sweep_on_slurm(args, spec, cfg, store, storage) -> int:
    """``saeuniv sweep --executor slurm``: the workers as one job array; 0 when the study
    holds its trials."""
    from .executors import ExecutorError
    from .sweep import check_n_trials
    from .sweep.cluster import run_workers

    try:
        ids = run_workers(args, args.storage, cfg.execution, store.root)
    except ExecutorError as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 1
    study = storage.storage.get_study_id_from_name(args.study or spec.study)
    complete = sum(t.state.name == "COMPLETE"
                   for t in storage.storage.get_all_trials(study, deepcopy=False))
    wanted = check_n_trials(spec, args.n_trials)
    print(f"saeuniv: study {args.study or spec.study!r} ({storage.url}): {complete} of "
          f"{wanted} trials complete, by {args.workers} workers in Slurm job array "
          f"{', '.join(ids)}")
    return 0 if complete >= wanted else 1


def project_dir() -> Path | None:
    """The MLflow project this process runs in: ``mlflow run`` starts the entry points of
    ``MLproject`` in the project's folder (``python -m saeuniv.cli COMMAND ...``)."""
    return Path.cwd() if (Path.cwd() / "MLproject").is_file() else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], project_dir=project_dir()))
