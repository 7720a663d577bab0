"""Optuna sweeps that run: a small sweep end to end, a Pareto sweep on a journal file,
resume after a kill, and two workers sharing one study on PostgreSQL. (The spec checks
are in test_spec.py, the objectives in test_objectives.py.)"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from saeuniv import cli
from saeuniv.cells import cell_metrics
from saeuniv.config import load_config
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store
from saeuniv.sweep import FAILURE_ATTR, PARENT_ATTR, RETRY_ATTR, RUN_ATTR, WORKER_ATTR

from .spec_files import write_spec

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ("corpus", "tokenizer", "windows", "model", "sae", "codes")

# The sweep command in a subprocess; SWEEP_TEST_DELAY slows each trial down (test only:
# it wraps the scoring function, the code under test is unchanged). The wrapper goes on
# saeuniv.sweep.objectives, the module the trials look score_trial up in at each trial.
WORKER = ("import os, sys, time\n"
          "import saeuniv.sweep.objectives as s\n"
          "delay = float(os.environ.get('SWEEP_TEST_DELAY', '0'))\n"
          "score = s.score_trial\n"
          "s.score_trial = lambda pipe: (time.sleep(delay), score(pipe))[1]\n"
          "from saeuniv.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


def count_entries(store: Path, kinds=UPSTREAM) -> dict[str, int]:
    return {k: len(list((store / k).glob("*/manifest.json"))) for k in kinds}


@pytest.fixture(scope="module")
def warm(tmp_path_factory, corpus_dir):
    """A store holding the tiny base artefacts (models, SAEs, codes), shared by the
    sweeps."""
    root = tmp_path_factory.mktemp("sweep")
    cfg = load_config("tiny", {"corpus.source": str(corpus_dir)})
    pipe = Pipeline(cfg, Store(root / "store"))
    pipe.validate()
    _ = pipe.a.codes, pipe.b.codes
    return {"root": root, "store": root / "store", "cfg": cfg,
            "corpus": str(corpus_dir)}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An empty MLflow SQLite database, made once (its migrations take seconds); each
    test works on a copy of it."""
    folder = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(folder)  # the default experiment's artefact root (./mlruns) is fixed here
    try:
        mlflow.MlflowClient(uri).search_experiments()
    finally:
        os.chdir(cwd)
    return folder / "mlflow.db"


@pytest.fixture()
def env(warm, empty_db, tmp_path, monkeypatch, request):
    """A copy of the empty MLflow database (so Optuna's default database beside it is the
    test's own too), a fresh experiment, a copy of the warm artefact store, and a private
    working folder."""
    folder = tmp_path / "tracking"
    folder.mkdir()
    uri = f"sqlite:///{shutil.copy(empty_db, folder / 'mlflow.db')}"
    experiment = f"{request.node.name[:60]}-{uuid.uuid4().hex[:6]}"
    store = shutil.copytree(warm["store"], tmp_path / "store",
                            ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    monkeypatch.setenv("SAEUNIV_HOME", str(store))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)  # made here, so concurrent workers find it
    yield {"uri": uri, "optuna": f"sqlite:///{folder / 'optuna.db'}", "folder": folder,
           "dir": tmp_path, "experiment": experiment, "store": store}
    while mlflow.active_run():
        mlflow.end_run()


def runs(env: dict):
    mlflow.set_tracking_uri(env["uri"])
    return mlflow.search_runs(experiment_names=[env["experiment"]])


def trials(storage: str, study: str):
    study = optuna.load_study(study_name=study, storage=storage)
    return study.get_trials(deepcopy=False)

# -- a small sweep, end to end --------------------------------------------------------

def test_small_sweep_end_to_end(warm, env, capsys):
    spec = write_spec(env["dir"])
    args = ["sweep", str(spec), "--set", f"corpus.source={warm['corpus']}"]
    before = count_entries(env["store"])
    scored_before = count_entries(env["store"], ("matches", "scores"))
    t0 = time.time()
    assert cli.main(args) == 0
    seconds = time.time() - t0
    # trials made no codes, models or SAEs
    assert count_entries(env["store"]) == before
    made = count_entries(env["store"], ("matches", "scores"))
    assert made["scores"] > scored_before["scores"]
    assert (env["folder"] / "optuna.db").exists()  # beside mlflow.db, a separate file

    r = runs(env)
    parents = r[r["tags.saeuniv.stage"] == "sweep"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    parent = parents.iloc[0]
    assert parent["params.sweep.seed"] == "0"
    assert parent["params.sweep.sampler"] == "tpe"
    assert parent["params.sweep.n_trials"] == "3"
    assert parent["params.sweep.storage"] == "sqlite"
    assert parent["params.sweep.spec"] == "spec"
    assert parent["tags.saeuniv.n_trials"] == "3"
    children = r[r["tags.mlflow.parentRunId"] == parent.run_id]
    trial_runs = children[children["tags.saeuniv.stage"] == "trial"]
    assert len(trial_runs) == 3 and set(trial_runs["status"]) == {"FINISHED"}
    stage_runs = children[children["tags.saeuniv.stage"] != "trial"]
    assert sorted(stage_runs["tags.saeuniv.stage"]) == ["extract", "models", "saes"]
    assert set(r["status"]) == {"FINISHED"}
    for _, t in trial_runs.iterrows():
        assert np.isfinite(t["metrics.rsa_z_middle"])
        by_cell = cell_metrics(t.run_id)
        for m in ("svcca/a0-b0", "svcca_z/a0-b0", "rsa_z/a0-b1", "n_pairs/a1-b2",
                  "n_threshold/a0-b0"):
            assert np.isfinite(by_cell[m]), m
            assert f"metrics.{m}" not in t.index  # tables, not keys, by default
        assert t["params.trial_number"] == t["tags.saeuniv.trial_number"]
        assert t["tags.saeuniv.study"] == "tiny-thresholds"
        assert {"params.match.threshold", "params.match.policy"} <= \
            set(t.dropna().index)

    client = mlflow.MlflowClient()
    arts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"trials.csv", "best.json", "summary.md", "sweep.yaml", "config.yaml",
            "optimization_history.png", "param_importances.png",
            "parallel_coordinate.png"} <= arts, arts
    csv_text = mlflow.artifacts.load_text(f"runs:/{parent.run_id}/trials.csv")
    assert len(csv_text.strip().splitlines()) == 1 + 3
    best = mlflow.artifacts.load_dict(f"runs:/{parent.run_id}/best.json")
    best_id = best["best_trial"]["mlflow_run_id"]
    best_run = trial_runs[trial_runs.run_id == best_id].iloc[0]
    assert best["best_trial"]["values"]["rsa_z_middle"] == \
        pytest.approx(trial_runs["metrics.rsa_z_middle"].max())
    assert best_run["metrics.rsa_z_middle"] == \
        pytest.approx(parent["metrics.best_rsa_z_middle"])

    study = optuna.load_study(study_name="tiny-thresholds", storage=env["optuna"])
    assert study.user_attrs[PARENT_ATTR] == parent.run_id
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    print(f"\nsweep of 3 tiny trials: {seconds:.1f} s, trials "
          f"{', '.join(f'{s:.2f}' for s in trial_runs['metrics.trial_seconds'])} s")

    # the same command again: the study is complete, nothing runs, the parent is reused
    assert cli.main(args) == 0
    r = runs(env)
    assert len(r) == len(children) + 1 and set(r["status"]) == {"FINISHED"}
    # another search space on the same study is refused, and the parent is left as it
    # was
    other = write_spec(env["dir"], "other", params={
        "match.threshold": {"type": "float", "low": 0.0, "high": 0.2}})
    assert cli.main(["sweep", str(other), "--set",
                     f"corpus.source={warm['corpus']}"]) == 2
    assert "was started from a different spec" in capsys.readouterr().err
    assert set(runs(env)["status"]) == {"FINISHED"}


def test_pareto_sweep_on_a_journal_file(warm, env):
    spec = write_spec(
        env["dir"], study="tiny-pareto", sampler={"name": "nsga2", "seed": 0,
                                                  "options": {"population_size": 4}},
        objectives=[{"metric": "svcca", "layers": "all"},
                    {"metric": "n_pairs", "layers": "middle", "direction": "maximize"}])
    journal = env["dir"] / "optuna-journal.log"
    assert cli.main(["sweep", str(spec), "--set", f"corpus.source={warm['corpus']}",
                     "--storage", str(journal), "--n-trials", "2"]) == 0
    study = optuna.load_study(
        study_name="tiny-pareto", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
    r = runs(env)
    parent = r[r["tags.saeuniv.stage"] == "sweep"].iloc[0]
    assert parent["status"] == "FINISHED"
    assert parent["params.sweep.storage"] == "journal"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id)}
    assert {"pareto_front.png", "optimization_history_svcca_observed_all.png",
            "optimization_history_n_pairs_middle.png",
            "parallel_coordinate_n_pairs_middle.png"} <= arts, arts
    best = mlflow.artifacts.load_dict(f"runs:/{parent.run_id}/best.json")
    front = best["pareto_front"]
    assert front and all(set(f["values"]) == {"svcca_observed_all", "n_pairs_middle"}
                         for f in front)
    # each trial's second objective: the mean of its pair counts over the layer pairs of
    # the A layers at relative depth 1/3 to 2/3 (tiny A: 2 blocks, so layer 0 alone)
    pipe = Pipeline(warm["cfg"], Store(env["store"]))
    middle = [la for la in pipe.a.layers if 1 / 3 <= (la + 1) / pipe.a.info.n_layers <= 2 / 3]
    assert middle == [0]
    trial_runs = r[r["tags.saeuniv.stage"] == "trial"]
    assert len(trial_runs) == 2
    for _, t in trial_runs.iterrows():
        by_cell = cell_metrics(t.run_id)
        counts = [by_cell[f"n_pairs/a{la}-b{lb}"] for la in middle for lb in pipe.b.layers]
        assert min(counts) > 0
        assert t["metrics.n_pairs_middle"] == pytest.approx(np.mean(counts))
    logged = {tuple(t[f"metrics.{k}"] for k in ("svcca_observed_all", "n_pairs_middle"))
              for _, t in trial_runs.iterrows()}
    assert {(f["values"]["svcca_observed_all"], f["values"]["n_pairs_middle"])
            for f in front} <= logged


def test_storage_must_not_be_the_mlflow_database(warm, env, capsys):
    spec = write_spec(env["dir"])
    code = cli.main(["sweep", str(spec), "--set", f"corpus.source={warm['corpus']}",
                     "--storage", env["uri"]])
    assert code == 2
    assert "Optuna and MLflow need separate SQLite files" in capsys.readouterr().err


# -- resume after a kill --------------------------------------------------------------

def _worker_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited ({p.returncode}) while waiting "
                                     f"for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_sweep_resumes_without_duplicated_or_lost_trials(warm, env):
    spec = write_spec(env["dir"], study="tiny-resume")
    args = [sys.executable, "-c", WORKER, "sweep", str(spec), "--set",
            f"corpus.source={warm['corpus']}"]
    with open(env["dir"] / "first.log", "w") as log:  # the child keeps its own copy
        first = subprocess.Popen(args, cwd=env["dir"], env=_worker_env(SWEEP_TEST_DELAY=3),
                                 stdout=log, stderr=subprocess.STDOUT)

    def second_trial_running():
        try:
            ts = trials(env["optuna"], "tiny-resume")
        except Exception:  # noqa: BLE001 - the study is not there yet
            return None
        done = [t for t in ts if t.state == TrialState.COMPLETE]
        running = [t for t in ts
                   if t.state == TrialState.RUNNING and RUN_ATTR in t.user_attrs]
        return running[0] if done and running else None

    try:
        killed = _wait(second_trial_running, 240, "trial 1 to start", [first])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert killed.number == 1 and killed.params
    r = runs(env)
    ours = r[r["tags.saeuniv.stage"].isin(["sweep", "trial"])]
    assert set(ours["status"]) >= {"RUNNING"}

    second = subprocess.run(args, cwd=env["dir"], env=_worker_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]

    ts = trials(env["optuna"], "tiny-resume")
    numbers = [t.number for t in ts]
    assert len(set(numbers)) == len(numbers)
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    dead = next(t for t in ts if t.number == killed.number)
    assert dead.state == TrialState.FAIL
    assert "stopped during the trial" in dead.user_attrs[FAILURE_ATTR]
    retried = [t for t in complete if t.user_attrs.get(RETRY_ATTR) == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert {t.state for t in ts} <= {TrialState.COMPLETE, TrialState.FAIL}
    # both runs did trials
    assert len({t.user_attrs[WORKER_ATTR] for t in complete}) == 2

    r = runs(env)
    assert "RUNNING" not in set(r["status"])
    parents = r[r["tags.saeuniv.stage"] == "sweep"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    trial_runs = r[r["tags.saeuniv.stage"] == "trial"]
    assert (trial_runs["tags.mlflow.parentRunId"] == parents.iloc[0].run_id).all()
    finished = trial_runs[trial_runs.status == "FINISHED"]
    assert sorted(finished["tags.saeuniv.trial_number"].astype(int)) == \
        sorted(t.number for t in complete)
    dead_run = trial_runs[trial_runs.run_id == killed.user_attrs[RUN_ATTR]].iloc[0]
    assert dead_run["status"] == "FAILED" and "stopped during trial 1" in \
        dead_run["tags.saeuniv.error"]
    assert len(trial_runs) == 4


# -- two workers, one study, on PostgreSQL --------------------------------------------

def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = ([Path(found).parent] if found else []) + sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in candidates
                 if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """``$SAEUNIV_TEST_POSTGRES_URL`` (.ci/run starts a server and sets it), or a
    throwaway server on loopback when the PostgreSQL binaries are here; otherwise skip
    (fail when ``SAEUNIV_REQUIRE_POSTGRES=1``, as in CI)."""
    def unavailable(why: str):
        if os.environ.get("SAEUNIV_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here (SAEUNIV_REQUIRE_POSTGRES=1): "
                        f"{why}")
        pytest.skip(f"distributed sweep test skipped: {why}")

    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the PostgreSQL driver psycopg (psycopg[binary]) is not installed")
    if os.environ.get("SAEUNIV_TEST_POSTGRES_URL"):
        yield os.environ["SAEUNIV_TEST_POSTGRES_URL"]
        return
    bin_dir = _pg_bin()
    if bin_dir is None:
        unavailable("no PostgreSQL server here (initdb/pg_ctl not found; .ci/run "
                    "installs the Debian package postgresql and sets "
                    "SAEUNIV_TEST_POSTGRES_URL)")
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="saeuniv-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
        runuser = shutil.which("runuser", path=path)
        if runuser is None:
            shutil.rmtree(folder, ignore_errors=True)
            unavailable("running as root and runuser is missing (initdb refuses root)")
        run_as = [runuser, "-u", user, "--"]
    data, port = folder / "data", _free_port()
    pg_ctl = run_as + [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(run_as + [str(bin_dir / "initdb"), "-D", str(data), "-U",
                                 "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(pg_ctl + ["-l", str(data / "server.log"), "-w", "-t", "60", "-o",
                                 f"-c listen_addresses=127.0.0.1 -p {port} -k {data} "
                                 "-c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(err, "stderr", b"") or b""
        unavailable(f"could not start a local PostgreSQL server: {err} "
                    f"{detail.decode()[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(pg_ctl + ["-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(warm, env, postgres_url):
    study = f"tiny-distributed-{uuid.uuid4().hex[:8]}"
    n_trials = 6
    spec = write_spec(env["dir"], study=study, n_trials=n_trials)
    args = [sys.executable, "-c", WORKER, "sweep", str(spec), "--set",
            f"corpus.source={warm['corpus']}", "--storage", postgres_url]
    workers = []
    for i in range(2):
        with open(env["dir"] / f"worker{i}.log", "w") as log:  # the child keeps its own copy
            workers.append(subprocess.Popen(args, cwd=env["dir"],
                                            env=_worker_env(SWEEP_TEST_DELAY=1.5), stdout=log,
                                            stderr=subprocess.STDOUT))
    try:
        codes = [w.wait(timeout=400) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    output = "\n".join((env["dir"] / f"worker{i}.log").read_text()[-2000:]
                       for i in range(2))
    assert codes == [0, 0], output

    complete = exact_trials(env, postgres_url, study, n_trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in complete}) == 2, \
        "both workers ran trials"


def exact_trials(env, storage: str, study: str, n_trials: int) -> list:
    """Check that the study and the MLflow runs hold exactly ``n_trials`` trials, numbered
    without gaps, every run closed; returns the COMPLETE trials."""
    ts = trials(storage, study)
    numbers = [t.number for t in ts]
    assert sorted(numbers) == list(range(len(numbers)))  # no number twice, none lost
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    # PRUNED: not needed
    assert {t.state for t in ts} <= {TrialState.COMPLETE, TrialState.PRUNED}
    r = runs(env)
    assert "RUNNING" not in set(r["status"])
    parents = r[r["tags.saeuniv.stage"] == "sweep"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    trial_runs = r[r["tags.saeuniv.stage"] == "trial"]
    assert len(trial_runs) == n_trials and set(trial_runs["status"]) == {"FINISHED"}
    assert sorted(trial_runs["tags.saeuniv.trial_number"].astype(int)) == \
        sorted(t.number for t in complete)
    assert parents.iloc[0]["params.sweep.storage"] == "postgresql"
    return complete


# -- the workers as a Slurm job array -------------------------------------------------

def test_slurm_workers_are_refused_a_storage_they_cannot_share(warm, env, capsys):
    spec = write_spec(env["dir"], study="tiny-slurm-refused", n_trials=2)
    sqlite = env["dir"] / "optuna-shared.db"
    for extra in ([], ["--storage", f"sqlite:///{sqlite}"], ["--storage", "trials.log"]):
        assert cli.main(["sweep", str(spec), "--executor", "slurm", "--workers", "2",
                         *extra]) == 2
        err = capsys.readouterr().err
        assert "--executor slurm needs an Optuna storage on a database server" in err, err
        assert "pass --storage postgresql://user@host/db" in err
    assert not sqlite.exists() and not (env["dir"] / "trials.log").exists()
    assert cli.main(["sweep", str(spec), "--executor", "slurm"]) == 2
    assert "--executor slurm needs --workers N >= 1, got None" in capsys.readouterr().err
    assert cli.main(["sweep", str(spec), "--workers", "2"]) == 2
    assert "--workers is for --executor slurm" in capsys.readouterr().err


@pytest.mark.usefixtures("slurm_cluster")
def test_two_workers_as_a_slurm_job_array_keep_the_exact_trial_count(warm, env, postgres_url,
                                                                     capsys):
    study = f"tiny-slurm-{uuid.uuid4().hex[:8]}"
    n_trials = 6
    spec = write_spec(env["dir"], study=study, n_trials=n_trials)
    assert cli.main(["sweep", str(spec), "--set", f"corpus.source={warm['corpus']}",
                     "--storage", postgres_url, "--executor", "slurm", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{n_trials} of {n_trials} trials complete, by 2 workers in Slurm job array" in out
    exact_trials(env, postgres_url, study, n_trials)
