"""The Optuna storage a study lives in: SQLite beside MLflow's database, a journal
file, or a database server that workers on several machines share.

``open_storage`` refuses in one line what would go wrong later: not a URL, MLflow's own
SQLite file, a server that cannot be reached. A database storage keeps a heartbeat per
running trial; a trial whose heartbeat stops is failed by Optuna, and
``requeue_trial`` queues its parameters again.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .attrs import RETRIES_ATTR, RETRY_ATTR

# the package's logger, "saeuniv.sweep", for every module: the name log lines carry
log = logging.getLogger(__package__)

HEARTBEAT_INTERVAL = 15  # seconds between heartbeats of a running trial (database)
GRACE_PERIOD = 60  # a trial with no heartbeat for this long belongs to a dead worker
MAX_RETRY = 3  # times the parameters of a trial whose worker died are queued again
CONNECT_ATTEMPTS = 6  # tries at a new database whose tables another worker creates


class StorageError(ValueError):
    """The Optuna storage cannot be opened or clashes with the MLflow store."""


@dataclass
class StorageInfo:
    """An opened Optuna storage and how to show it."""

    storage: Any
    url: str  # for display: the password hidden
    kind: str  # sqlite, postgresql, mysql, journal


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (resolved), or None for any other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def default_storage_url(tracking_uri: str) -> str:
    """``sqlite:///<dir>/optuna.db``: beside the MLflow SQLite database, or in the
    working directory when MLflow tracks elsewhere. Never the MLflow file itself."""
    mlflow_db = sqlite_path(tracking_uri)
    folder = mlflow_db.parent if mlflow_db is not None else Path.cwd().resolve()
    return f"sqlite:///{folder / 'optuna.db'}"


def requeue_trial(study, trial) -> None:
    """Queue the parameters of a trial whose worker died (at most MAX_RETRY times).

    Optuna's stale-trial callback (``heartbeat_stale_trial_callback``), and what a
    worker calls on the trials it fails itself. The queued trial names the first one it
    retries (``RETRY_ATTR``), so a chain of retries points at one original."""
    retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
    if retries >= MAX_RETRY:
        log.warning("trial %d: its worker died %d times with these parameters; "
                    "not retried", trial.number, retries + 1)
        return
    study.enqueue_trial(trial.params, user_attrs={
        RETRY_ATTR: int(trial.user_attrs.get(RETRY_ATTR, trial.number)),
        RETRIES_ATTR: retries + 1})
    log.info("trial %d failed with its worker; its parameters are queued again",
             trial.number)


def open_storage(url: str | None, tracking_uri: str) -> StorageInfo:
    """An Optuna storage for ``url``: ``None``/``default`` (SQLite beside MLflow's), a
    database URL, or a path ending in ``.log`` (a journal file)."""
    if not url or url == "default":
        url = default_storage_url(tracking_uri)
    if "://" not in url:
        return _journal(url)
    url, shown, kind = _database_url(url)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if kind == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            if path == sqlite_path(tracking_uri):
                raise StorageError(
                    f"--storage {shown} is the MLflow tracking database; Optuna and "
                    "MLflow need separate SQLite files (e.g. sqlite:///optuna.db)")
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return StorageInfo(_connect(url, shown, engine_kwargs), shown, kind)


def _journal(path_text: str) -> StorageInfo:
    """A journal file storage at ``path_text``, which must end in ``.log``."""
    if not path_text.endswith(".log"):
        raise StorageError(f"--storage {path_text!r} is neither a database URL "
                           "(sqlite:///..., postgresql://...) nor a journal file "
                           "ending in .log")
    path = Path(path_text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(path)))
    return StorageInfo(storage, str(path), "journal")


def _database_url(url: str) -> tuple[str, str, str]:
    """The URL to connect with, the URL to show (password hidden), the backend name."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise StorageError(f"--storage {url!r} is not a database URL: {err}") from None
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg"):
        # psycopg 3 (a dependency), whichever driver this SQLAlchemy defaults to
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    return url, parsed.render_as_string(hide_password=True), parsed.get_backend_name()


def _connect(url: str, shown: str, engine_kwargs: dict):
    """The RDB storage with heartbeats and stale-trial retries; a failure to connect is
    a StorageError naming the storage and the first line of the driver's message."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    for attempt in range(CONNECT_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                    heartbeat_stale_trial_callback=requeue_trial)
        except (IntegrityError, ProgrammingError):
            # workers started together on a new database race to create its tables:
            # the loser waits and opens what the winner made
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            time.sleep(1 + attempt)
        except (SQLAlchemyError, ImportError) as err:
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise StorageError(
                f"cannot open the Optuna storage {shown}: {first}") from None
    raise AssertionError("unreachable")
