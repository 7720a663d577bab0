"""Shared fixtures: an offline environment, a synthetic corpus, a private MLflow store, and
the tiny pipeline run that many tests read.

``tiny_run`` is one ``saeuniv run`` of the tiny config on the synthetic corpus into a
private store and MLflow database, then a warm rerun. Tests only read it. A test that
writes (new store entries, new runs, changed artefacts) works on ``own_store`` (a copy of
the store) and ``own_tracking`` (its own MLflow database)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from helpers import OFFLINE_ENV, private_runs, synthetic_text

os.environ.update(OFFLINE_ENV)


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (use with -p no:randomly): "
                          "a test that needs another's leftovers fails")


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, if it is active
def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder of 120 synthetic .txt documents."""
    path = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(synthetic_text(120)):
        (path / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A private MLflow SQLite store and artefact store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAEUNIV_HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_dir):
    """One tiny `saeuniv run` into a private store and MLflow database, then a warm rerun."""
    root = tmp_path_factory.mktemp("run")
    from saeuniv import cli
    from saeuniv.config import load_config

    args = ["run", "--config", "tiny", "--set", f"corpus.source={corpus_dir}"]
    with private_runs(root, chdir=True) as uri:  # its artefacts (./mlruns) under root too
        t0 = time.time()
        assert cli.main(args) == 0
        cold = time.time() - t0
        entries = sorted(p.name for p in (root / "store").rglob("manifest.json"))
        t0 = time.time()
        assert cli.main(args) == 0
        warm = time.time() - t0
        entries_after = sorted(p.name for p in (root / "store").rglob("manifest.json"))
    return {"root": root, "uri": uri, "cold": cold, "warm": warm, "store": root / "store",
            "n_entries": (len(entries), len(entries_after)), "args": args,
            "cfg": load_config("tiny", {"corpus.source": str(corpus_dir)})}


@pytest.fixture()
def tiny_pipe(tiny_run):
    """A pipeline of the tiny run's config on its store (read only)."""
    from saeuniv.pipeline import Pipeline
    from saeuniv.store import Store

    return Pipeline(tiny_run["cfg"], Store(tiny_run["store"]))


@pytest.fixture()
def own_store(tiny_run, tmp_path):
    """A copy of the tiny run's store, for a test that adds or rebuilds entries."""
    return shutil.copytree(tiny_run["store"], tmp_path / "store",
                           ignore=shutil.ignore_patterns("*.lock"))


@pytest.fixture()
def own_tracking(tmp_path, monkeypatch, own_store):
    """A private MLflow database in a private working folder, with ``own_store`` as the
    default store; yields the tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAEUNIV_HOME", str(own_store))
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster this machine can submit to (``.ci/run`` starts one on loopback and
    sets ``SLURM_CONF``; ``bash .ci/slurm.sh --foreground`` starts one by hand). Skipped
    when there is none, except under ``SAEUNIV_REQUIRE_SLURM=1`` (CI), where that fails."""
    import subprocess

    why = ""
    if shutil.which("sbatch") is None:
        why = "Slurm's sbatch is not on PATH"
    else:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=60)
        up = {"idle", "mixed", "allocated", "completing"}
        if out.returncode != 0 or not up & set(out.stdout.split()):
            why = f"no Slurm node answers (sinfo: {(out.stderr or out.stdout).strip()!r})"
    if why:
        if os.environ.get("SAEUNIV_REQUIRE_SLURM") == "1":
            pytest.fail(f"a Slurm cluster is required here (SAEUNIV_REQUIRE_SLURM=1): {why}")
        pytest.skip(f"Slurm tests skipped: {why}; start a cluster with "
                    "`bash .ci/slurm.sh --foreground` and export the SLURM_CONF it prints")
