"""MLflow tracking: where runs go, stage runs that always end, lineage tags.

With no ``MLFLOW_TRACKING_URI`` set, runs go to ``sqlite:///mlflow.db`` in the
working directory. Every stage runs inside ``stage_run``: a nested child when a
parent is active, the project run when launched by ``mlflow run`` (which sets
``MLFLOW_RUN_ID``), or a new top-level run. An exception, Ctrl-C, SIGTERM or
SIGHUP ends the run (and so its parent) as FAILED with the error in the
``saeuniv.error`` tag and an ``error.txt`` artefact; no run is left RUNNING by a
failure the process sees. SIGKILL cannot be seen: its runs stay RUNNING, and
each run's ``saeuniv.host``/``saeuniv.pid`` tags let ``saeuniv doctor`` find them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import platform
import re
import signal
import subprocess
import tempfile
import traceback
from pathlib import Path

import mlflow

from . import __version__
from .files import sha256_file

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant);
# with it, on the runs table
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_name(name: str) -> str:
    """The default experiment of a config, sweep study or ladder named ``name``."""
    return f"saeuniv/{name}"


def setup_tracking(experiment: str | None = None, default: str = experiment_name("runs")) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or the local SQLite store; pick the experiment:
    ``experiment``, else ``$MLFLOW_EXPERIMENT_NAME``, else ``default``. The experiment is
    tagged as a model-development one (``EXPERIMENT_KIND``) unless it has a kind."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    mlflow.set_tracking_uri(uri)
    # Inside `mlflow run` the experiment is fixed by the launcher (MLFLOW_EXPERIMENT_ID);
    # switching it would make the project run unreachable.
    if "MLFLOW_RUN_ID" in os.environ or mlflow.active_run() is not None:
        exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or (
            mlflow.active_run().info.experiment_id if mlflow.active_run() else None)
    else:
        exp_id = mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                       or default).experiment_id
    if exp_id is not None:
        mark_experiment(exp_id)
    return uri


def browse_hint(uri: str, run_id: str) -> str:
    """How to look at a run: the ``mlflow ui`` command and the page of the run. The page
    asks for the UI's model-training view (``workflowType``): MLflow 3's UI opens every
    experiment in its GenAI view otherwise, whatever the experiment's kind."""
    exp = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return (f"  mlflow ui --backend-store-uri {uri}\nthen open\n  http://127.0.0.1:5000/#/"
            f"experiments/{exp}/runs/{run_id}?workflowType=machine_learning")


def mark_experiment(experiment_id: str) -> None:
    """Tag an experiment as model development (``EXPERIMENT_KIND``) unless it has a kind."""
    client = mlflow.MlflowClient()
    key, value = EXPERIMENT_KIND
    if key not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, key, value)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived: leave with status 128 + signal, closing runs as FAILED."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _while_stopping(signum, frame):  # pragma: no cover - exercised by subprocess tests
    """A second signal while the first one's cleanup runs: let the cleanup finish."""


def _terminate(signum, frame):  # pragma: no cover - exercised by subprocess tests
    for sig in STOP_SIGNALS:  # the runs must still be closed: do not cut that short
        signal.signal(sig, _while_stopping)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into ``Terminated`` (a SystemExit) so open runs are closed
    as FAILED; a repeated signal does not interrupt that cleanup."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _terminate)


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the saeuniv source tree, when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"saeuniv.git_commit": commit, "saeuniv.git_dirty": str(bool(dirty)).lower()} \
        if commit else {}


LIBRARIES = ("torch", "mlflow", "sae_lens", "transformer_lens", "optuna", "numpy")
CHECKSUMS = "artifacts.sha256.json"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (``unknown`` when absent)."""
    from importlib import metadata

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[lib] = "unknown"
    return out


def code_version() -> str:
    """SHA-256 over the saeuniv package's source files: the code that made a result,
    with or without a git checkout, uncommitted changes included."""
    import hashlib

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def lineage_tags(config_hash: str | None = None) -> dict[str, str]:
    """Code and environment lineage: saeuniv version, git commit and dirty flag, Python and
    library versions (``saeuniv.<library>``), and the config hash when given."""
    tags = {"saeuniv.version": __version__, "saeuniv.python": platform.python_version(),
            "saeuniv.code_version": code_version(),
            **{f"saeuniv.{lib}": v for lib, v in library_versions().items()}, **git_info()}
    if config_hash:
        tags["saeuniv.config_hash"] = config_hash
    return tags


def artifact_paths(client, run_id: str, path: str | None = None) -> list:
    out = []
    for info in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, info.path) if info.is_dir else [info]
    return out


def artifact_checksums(run_id: str) -> dict[str, dict]:
    """Size and SHA-256 of every artefact of a run (the checksum record itself left out)."""
    client = mlflow.MlflowClient()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for info in artifact_paths(client, run_id):
            if info.path == CHECKSUMS:
                continue
            local = Path(client.download_artifacts(run_id, info.path, tmp))
            out[info.path] = {"size": local.stat().st_size, "sha256": sha256_file(local)}
    return out


def log_checksums() -> None:
    """Log ``artifacts.sha256.json``: size and SHA-256 of every artefact of the active run."""
    run_id = mlflow.active_run().info.run_id
    mlflow.log_dict(artifact_checksums(run_id), CHECKSUMS)


@contextlib.contextmanager
def stage_run(stage: str, run_name: str | None = None, tags: dict | None = None):
    """Open the MLflow run of one stage; end it FINISHED, or FAILED with the error recorded.

    A run that ends FINISHED first logs ``artifacts.sha256.json`` (``log_checksums``), the
    record that ``saeuniv audit`` checks its artefacts against. The run is tagged with the
    process that runs it (``saeuniv.host``, ``saeuniv.boot_id``, ``saeuniv.pid``,
    ``saeuniv.pid_start``)."""
    from .procs import owner_tags

    nested = mlflow.active_run() is not None
    run = mlflow.start_run(run_name=run_name or stage, nested=nested)
    try:
        # who runs it: `saeuniv doctor` finds a RUNNING run whose process is gone
        mlflow.set_tags({"saeuniv.stage": stage, **owner_tags(), **(tags or {})})
        yield run
    except BaseException as err:
        record_failure(err)
        mlflow.end_run("FAILED")
        raise
    else:
        try:
            log_checksums()
        except BaseException as err:
            record_failure(err)
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")


def record_failure(err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    with contextlib.suppress(Exception):
        mlflow.set_tag("saeuniv.error", f"{type(err).__name__}: {err}"[:4900])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "error.txt"
            path.write_text(text)
            mlflow.log_artifact(str(path))


def pair_key(la: int, lb: int) -> str:
    """The suffix of every per-layer-pair metric: ``a{la}-b{lb}`` (``svcca/a1-b2``)."""
    return f"a{la}-b{lb}"


def warn(key: str, msg: str) -> None:
    """A problem that does not stop the stage but must not pass unseen: a log line and a
    ``saeuniv.warning.<key>`` tag on the active run."""
    log.warning(msg)
    mlflow.set_tag(f"saeuniv.warning.{key}", msg[:4900])


def metric_name(text: str) -> str:
    """``text`` with the characters MLflow refuses in a metric name replaced by ``_``."""
    return re.sub(r"[^\w\-. /]", "_", text)


def csv_text(rows: list[dict]) -> str:
    """Rows (dicts with the same keys) as CSV text with a header, for ``mlflow.log_text``."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
