"""Crashes and recovery: processes killed at chosen and at random points, SIGTERM, runs left
RUNNING by SIGKILL and ``saeuniv doctor``, two runs at once on one store, determinism.

Every comparison is exact: a resumed, restarted or concurrent run must give the same bits
as an uninterrupted one. The killed processes are real processes killed with SIGKILL.
The extraction and SAE kills fork them from a ``forkserver`` that has imported the
libraries once (a fresh interpreter costs seconds of imports per kill point); the
``saeuniv run`` tests start the command itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
from filelock import FileLock

import saeuniv
from saeuniv import cli, stages
from saeuniv.cells import cell_metrics
from saeuniv.config import load_config
from saeuniv.doctor import check_store, orphan_reason, verify_entry
from saeuniv.pipeline import Pipeline
from saeuniv.procs import hostname, owner_tags
from saeuniv.stages import similarity
from saeuniv.store import NOT_KINDS, PARTIAL, Store, What

from helpers import env_vars

SRC = str(Path(saeuniv.__file__).resolve().parents[1])
SHARD_WINDOWS = 4  # 13 shards per model: many points to be killed at
DOWNSTREAM = ("codes", "matches", "scores", PARTIAL)
SEED = 20240611  # the random kill times


def _overrides(corpus_dir) -> dict:
    # the ceiling's and the floor's extra SAEs and codes would multiply every count and kill
    # point here; they go through the same store code, and tests/stages/test_convergence.py
    # checks them
    return {"corpus.source": str(corpus_dir), "extract.shard_windows": SHARD_WINDOWS,
            "similarity.ceiling": False, "similarity.control": False}


def _args(corpus_dir) -> list[str]:
    return ["--config", "tiny"] + [a for k, v in _overrides(corpus_dir).items()
                                   for a in ("--set", f"{k}={v}")]


def _entries(root: Path, kinds) -> dict[tuple[str, str], Path]:
    return {(kind, p.parent.name): p.parent for kind in kinds
            for p in (Path(root) / kind).glob("*/manifest.json")
            if not p.parent.name.startswith(".")}  # not a temporary folder


def _same_files(a: Path, b: Path) -> None:
    """The files of two store entries hold the same bits (.npz: every array, its dtype too;
    the zip wrapper carries a timestamp)."""
    files = json.loads((a / "manifest.json").read_text())["files"]
    assert files.keys() == json.loads((b / "manifest.json").read_text())["files"].keys()
    for name, info in files.items():
        if name.endswith(".npz"):
            with np.load(a / name) as za, np.load(b / name) as zb:
                assert za.files == zb.files, name
                for k in za.files:
                    assert za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]), (a, k)
        else:
            assert info == json.loads((b / "manifest.json").read_text())["files"][name], (a, name)


def _same_store(ref: Path, other: Path, kinds) -> int:
    """Every entry of ``kinds`` in ``ref`` is in ``other`` with the same bits; returns how many."""
    mine, theirs = _entries(ref, kinds), _entries(other, kinds)
    assert mine.keys() == theirs.keys()
    for k, path in mine.items():
        _same_files(path, theirs[k])
    return len(mine)


def _copy(src: Path, dest: Path, leave_out=()) -> Path:
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if Path(d) == src
                                                       and n in leave_out or n.endswith(".lock")])
    return dest


def _visible_entries_whole(root: Path) -> int:
    """No half-written entry is visible: every entry folder a run would read (not a hidden
    temporary folder, not one moved aside as corrupt) matches its manifest."""
    n = 0
    for kind in root.iterdir():
        if kind.name in NOT_KINDS or not kind.is_dir():
            continue
        for entry in kind.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and ".corrupt-" not in entry.name:
                assert verify_entry(entry) is None, entry
                n += 1
    return n


def _finite_equal(m1: dict, m2: dict) -> bool:
    return m1.keys() == m2.keys() and all(
        m1[k] == m2[k] or (m1[k] != m1[k] and m2[k] != m2[k]) for k in m1)


def _runs(uri: str, experiment: str | None = None):
    mlflow.set_tracking_uri(uri)  # runs:/ artefact URIs read the global one
    client = mlflow.MlflowClient(uri)
    exps = [client.get_experiment_by_name(experiment).experiment_id] if experiment else \
        [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, max_results=1000)


def _by_stage(runs) -> dict:
    """Runs by stage; a concept-subspace layer-pair run by its name (subspaces:aI-bJ)."""
    return {r.info.run_name if r.data.tags["saeuniv.stage"] == "subspaces.pair"
            else r.data.tags["saeuniv.stage"]: r for r in runs}


# -- the reference: two cold runs, two fresh stores ------------------------------------

@pytest.fixture(scope="module")
def ref(tmp_path_factory, corpus_dir):
    """Two uninterrupted ``saeuniv run`` of one config and seed into two fresh stores (and
    two experiments, so no stage run is reused): the reference every crash test compares
    against, and the determinism test's pair."""
    root = tmp_path_factory.mktemp("crash")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    times, cwd = [], os.getcwd()
    os.chdir(root)  # the runs' artefacts (./mlruns) go there too
    try:
        with env_vars(MLFLOW_TRACKING_URI=uri):
            for i in (1, 2):
                t0 = time.time()
                assert cli.main(["run", *_args(corpus_dir), "--store", str(root / f"store{i}"),
                                 "--experiment", f"det{i}"]) == 0
                times.append(time.time() - t0)
    finally:
        os.chdir(cwd)
    return {"root": root, "uri": uri, "store": root / "store1", "corpus": corpus_dir,
            "cfg": load_config("tiny", _overrides(corpus_dir)), "times": times}


def test_same_config_and_seed_give_identical_results(ref):
    """Bit-identical metrics (every run, every step), grids.json and store entries
    (models, SAEs, codes, matches, scores.json) from two cold runs."""
    client, _ = _runs(ref["uri"])
    one, two = (_by_stage(_runs(ref["uri"], f"det{i}")[1]) for i in (1, 2))
    pairs = [f"subspaces:a{la}-b{lb}" for la, lb in Pipeline(
        ref["cfg"], Store(ref["store"])).subspace_pairs]
    assert sorted(one) == sorted(two) == sorted(("main",) + stages.NAMES + tuple(pairs))
    for stage, run in one.items():
        other = two[stage]
        assert run.info.status == other.info.status == "FINISHED"
        numbers = {**run.data.metrics, **cell_metrics(run.info.run_id)}
        others = {**other.data.metrics, **cell_metrics(other.info.run_id)}
        assert numbers and _finite_equal(numbers, others), stage
        for key in (k for k in run.data.metrics if "/" not in k):  # per-layer and curves
            def hist(r, key=key):
                return [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            assert hist(run) == hist(other), (stage, key)
    grids = [mlflow.artifacts.load_dict(f"runs:/{r['main'].info.run_id}/grids.json")
             for r in (one, two)]
    assert grids[0] == grids[1]
    kinds = ("corpus", "tokenizer", "windows", "model", "sae", "preflight", "codes", "matches",
             "scores", "labels", "subspaces")
    assert _same_store(ref["store"], ref["root"] / "store2", kinds) == 29 + 5 + 6  # + labels
    # of 5 layers and subspace scores of 6 layer pairs
    scores = sorted((ref["store"] / "scores").glob("*/scores.json"))
    assert len(scores) == 6 and all(
        p.read_bytes() == (ref["root"] / "store2" / "scores" / p.parent.name
                           / "scores.json").read_bytes() for p in scores)


# -- kills at chosen and random points --------------------------------------------------

def _child(root: str, overrides: dict, work: str, fault: str | None, pipe_end) -> None:
    """A process that extracts codes (``extract``) or trains SAEs (``saes``), maybe killed;
    it sends "ready" when the stage starts, then the stage's duration."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())  # not a semaphore that a killed process would leak
    if fault:
        os.environ["SAEUNIV_FAULT"] = fault
    pipe = Pipeline(load_config("tiny", overrides), Store(root))
    pipe_end.send("ready")
    t0 = time.perf_counter()
    if work == "extract":
        _ = pipe.a.codes, pipe.b.codes
    else:
        _ = pipe.a.sae_entries, pipe.b.sae_entries
    pipe_end.send(time.perf_counter() - t0)


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["saeuniv.pipeline", "sae_lens", "transformer_lens", "mlflow"])
    return ctx


def _run_child(ctx, root: Path, corpus_dir, work: str, fault: str | None = None,
               delay: float | None = None) -> tuple[int, float]:
    """Run ``_child``; SIGKILL it ``delay`` seconds into its stage. (exit code, the stage's
    seconds, or -1 when the stage never ended: the process died inside it)."""
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(str(root), _overrides(corpus_dir), work, fault,
                                            theirs))
    proc.start()
    theirs.close()
    assert mine.poll(120) and mine.recv() == "ready"
    if delay is not None:
        time.sleep(delay)
        proc.kill()
    proc.join(300)
    assert proc.exitcode is not None, "the child hung"
    try:
        took = mine.recv() if mine.poll() else -1.0  # sent only once the stage is done
    except EOFError:  # the pipe closed empty: the process died inside the stage
        took = -1.0
    mine.close()
    return proc.exitcode, took


def _campaign(ctx, upstream: Path, corpus, work: str, chosen: list[str], event: str,
              n_events: int, trial, n_random: int = 2) -> tuple[list, float]:
    """Kill a ``work`` process at each chosen fault point, at ``n_random`` seeded random
    counts of ``event`` (uniform in 1..n_events), then, after timing an uninterrupted
    process, at ``n_random`` seeded random times (uniform in 5% to 80% of its stage's
    seconds after the stage starts). Each kill is on a fresh copy of ``upstream`` and
    must land inside the stage; ``trial(root, point, exit_code)`` checks it and returns
    its report row."""
    rng = np.random.default_rng(SEED)
    points = chosen + [f"{event}:{n}" for n in np.sort(rng.integers(1, n_events + 1, n_random))]
    report = []
    for i, fault in enumerate(points):
        root = _copy(upstream, upstream.parent / f"kill{i}")
        code, ended = _run_child(ctx, root, corpus, work, fault)
        assert code == -signal.SIGKILL and ended < 0, fault  # reached, inside the stage
        report.append(trial(root, fault, code))
    whole = _copy(upstream, upstream.parent / "whole")
    code, took = _run_child(ctx, whole, corpus, work)
    assert code == 0 and took > 0
    report.append(trial(whole, "uninterrupted", code))  # another process: the same bits too
    for i, share in enumerate(np.sort(rng.uniform(0.05, 0.8, n_random))):
        root = _copy(upstream, upstream.parent / f"timed{i}")
        code, t = _timed_kill(ctx, root, corpus, work, float(share), took)
        report.append(trial(root, f"t={t:.2f}s", code))
    print(f"\n{work}: {len(report) - 1} kill points, uninterrupted {took:.2f}s (point, exit "
          "code, finished entries, pieces kept):", *report, sep="\n  ")
    return report, took


def _timed_kill(ctx, root: Path, corpus, work: str, share: float,
                took: float) -> tuple[int, float]:
    """SIGKILL a ``work`` process ``share`` of the stage's duration (``took`` seconds) into
    its stage, and check the kill landed inside the stage (the stage never reported its
    end). The stage's speed follows the machine's load (a shared machine: tenfold and more),
    so a stage that outran the kill is timed again on a fresh copy of ``root``, with its
    own duration as the new ``took``, at most five tries. (exit code, the delay that
    landed)."""
    clean = _copy(root, root.parent / f"{root.name}-clean")
    for _ in range(5):
        code, ended = _run_child(ctx, root, corpus, work, delay=share * took)
        if ended < 0:
            assert code == -signal.SIGKILL, code
            shutil.rmtree(clean)
            return code, share * took
        shutil.rmtree(root)
        _copy(clean, root)
        took = ended
    raise AssertionError(f"{work}: the stage outran a kill at {share:.0%} of its duration "
                         "five times")


def _same_scores(cfg, ref_store: Path, root: Path) -> None:
    pipe, reference = Pipeline(cfg, Store(root)), Pipeline(cfg, Store(ref_store))
    for la, lb in pipe.pairs:
        assert similarity.entry(pipe, la, lb).file("scores.json").read_bytes() == \
            similarity.entry(reference, la, lb).file("scores.json").read_bytes()


def test_killed_extraction_resumes_from_its_shards(ref, forkserver, tmp_path, monkeypatch):
    """SIGKILL during extraction at 4 chosen points (after the first shard, half-way through
    model A, after B's first shard, and between a layer's finished entry and its rename), 2
    seeded random shard counts and 2 seeded random times: the rerun computes exactly the
    shards that are missing and gives the reference's codes and scores, bit for bit."""
    import saeuniv.extract as extract

    cfg = ref["cfg"]
    upstream = _copy(ref["store"], tmp_path / "upstream", DOWNSTREAM)
    codes_keys = [k for _, k in _entries(ref["store"], ["codes"])]
    n_shards = -(-len(Pipeline(cfg, Store(upstream)).a.windows.tokens) // SHARD_WINDOWS)
    assert n_shards >= 10 and len(codes_keys) == 5
    saved = []
    real_save = extract._save_shard
    monkeypatch.setattr(extract, "_save_shard", lambda *a: (saved.append(a[0]), real_save(*a)))

    def trial(root, point, code):
        _visible_entries_whole(root)
        done = {k for k in codes_keys if (root / "codes" / k / "manifest.json").exists()}
        kept = {k: len(list(Store(root).partial_path("codes", k).glob("shard-*.npz")))
                for k in codes_keys if k not in done}
        saved.clear()
        pipe = Pipeline(cfg, Store(root))  # the rerun
        _ = pipe.a.codes, pipe.b.codes
        assert len(saved) == sum(n_shards - n for n in kept.values())  # kept shards reused
        assert _same_store(ref["store"], root, ["codes"]) == 5
        assert not [f for f in Store(root).scan() if f.what == What.PARTIAL]
        return point, code, len(done), sum(kept.values())

    report, _ = _campaign(forkserver, upstream, ref["corpus"], "extract",
                          ["shard:1", f"shard:{n_shards // 2}", f"shard:{n_shards + 1}",
                           "entry:2"], "shard", 2 * n_shards, trial)
    assert [r[2:] for r in report[:4]] == [
        (0, 2), (0, 2 * (n_shards // 2)),  # both layers of A keep their shards
        (2, 3),  # A finished; B's three layers keep one shard each
        (1, n_shards)]  # a whole layer whose entry was not renamed yet: nothing recomputed
    assert sum(r[3] for r in report) > 0
    assert [r[1] for r in report if r[0] != "uninterrupted"] == [-signal.SIGKILL] * 8
    _same_scores(cfg, ref["store"], upstream.parent / "timed1")


def test_killed_sae_training_restarts_cleanly(ref, forkserver, tmp_path, monkeypatch):
    """SIGKILL during SAE training at 4 chosen points (in the first SAE, in the second, in
    model B's first, and a trained SAE just before its rename), 2 seeded random steps and 2
    seeded random times: no half-written SAE entry is ever visible, finished SAEs are kept,
    an interrupted one is trained again from the start, and the weights are the
    reference's bit for bit."""
    import saeuniv.saes as saes

    cfg = ref["cfg"]
    upstream = _copy(ref["store"], tmp_path / "upstream", ("sae", "preflight") + DOWNSTREAM)
    sae_keys = [k for _, k in _entries(ref["store"], ["sae"])]
    assert len(sae_keys) == 5
    fits = []
    real_fit = saes._fit
    monkeypatch.setattr(saes, "_fit", lambda *a: (fits.append(a[1]), real_fit(*a))[1])

    def trial(root, point, code):
        _visible_entries_whole(root)
        done = sum((root / "sae" / k / "manifest.json").exists() for k in sae_keys)
        temps = list((root / "sae").glob(".tmp-*"))
        found, _ = check_store(root, older_than=3600, fix=True)  # the killed builder's folder
        assert sorted(f.where for f in found if f.what == "STALE-TEMP") == sorted(map(str, temps))
        assert not list((root / "sae").glob(".tmp-*"))
        fits.clear()
        pipe = Pipeline(cfg, Store(root))
        _ = pipe.a.sae_entries, pipe.b.sae_entries
        assert len(fits) == len(sae_keys) - done  # finished SAEs kept, the rest trained
        assert _same_store(ref["store"], root, ["sae"]) == 5
        return point, code, done, len(temps)

    steps = cfg.sae.train_tokens // cfg.sae.batch_tokens  # per SAE
    report, _ = _campaign(forkserver, upstream, ref["corpus"], "saes",
                          ["sae_step:5", f"sae_step:{steps + 72}", f"sae_step:{2 * steps + 44}",
                           "entry:4"], "sae_step", 5 * steps - 8, trial)
    # SAEs finished before the kill, and the interrupted SAE's hidden temporary folder
    assert [r[2:] for r in report[:4]] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert [r[1] for r in report if r[0] != "uninterrupted"] == [-signal.SIGKILL] * 8
    _same_scores(cfg, ref["store"], upstream.parent / "timed1")


# -- MLflow run states: exception, SIGTERM, SIGKILL and doctor ----------------------------

def test_exception_in_a_stage_fails_the_stage_and_main_runs(ref, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    store = _copy(ref["store"], tmp_path / "store")

    def boom(pipe):
        raise RuntimeError("boom in the match stage")

    monkeypatch.setattr(stages.get("match").module, "run", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["run", *_args(ref["corpus"]), "--store", str(store)])
    client, runs = _runs(uri)
    by = _by_stage(runs)
    assert {s: r.info.status for s, r in by.items()} == {
        "main": "FAILED", "models": "FINISHED", "saes": "FINISHED", "extract": "FINISHED",
        "match": "FAILED"}  # no run left RUNNING, similarity never started
    for stage in ("main", "match"):
        assert by[stage].data.tags["saeuniv.error"] == "RuntimeError: boom in the match stage"
        text = mlflow.artifacts.load_text(f"runs:/{by[stage].info.run_id}/error.txt")
        assert text.startswith("Traceback") and "RuntimeError: boom in the match stage" in text
        assert by[stage].data.tags["saeuniv.pid"] == str(os.getpid())


def _start_cli(args: list[str], log: Path, cpu: int | None = None, **env) -> subprocess.Popen:
    """``saeuniv ARGS`` in a new process (on one CPU when ``cpu`` is given), output to
    ``log``."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [SRC] + [p for p in [os.environ.get("PYTHONPATH")] if p]), **env}
    cpus = sorted(os.sched_getaffinity(0))
    pin = (lambda: os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})) if cpu is not None \
        else None
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "saeuniv.cli", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=full, start_new_session=True,
                                preexec_fn=pin, cwd=log.parent)


def _wait_for(log: Path, proc: subprocess.Popen, text: str, timeout: float = 180) -> None:
    end = time.time() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < end, f"no {text!r} after {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _signal_paused_run(args: list[str], log: Path, uri: str, shard: int, sig: int,
                       status: int) -> subprocess.Popen:
    """``saeuniv ARGS`` paused at extraction shard ``shard``, then sent ``sig``; checks
    that it exits with ``status`` and returns the ended process."""
    proc = _start_cli(args, log, MLFLOW_TRACKING_URI=uri, SAEUNIV_FAULT=f"shard:{shard}:pause")
    try:
        _wait_for(log, proc, f"saeuniv fault: pause at shard {shard}")
        proc.send_signal(sig)
        assert proc.wait(120) == status
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


def test_sigterm_fails_the_main_run_and_its_active_child(ref, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = _copy(ref["store"], tmp_path / "store", DOWNSTREAM)
    log = tmp_path / "run.log"
    proc = _signal_paused_run(["run", *_args(ref["corpus"]), "--store", str(store)], log, uri,
                              3, signal.SIGTERM, 128 + signal.SIGTERM)
    client, runs = _runs(uri)
    by = _by_stage(runs)
    assert {s: r.info.status for s, r in by.items()} == {
        "main": "FAILED", "models": "FINISHED", "saes": "FINISHED", "extract": "FAILED"}
    for stage in ("main", "extract"):
        assert by[stage].data.tags["saeuniv.error"] == "Terminated: terminated by SIGTERM"
        assert "Terminated" in mlflow.artifacts.load_text(
            f"runs:/{by[stage].info.run_id}/error.txt")
        assert by[stage].data.tags["saeuniv.pid"] == str(proc.pid)
    assert len(list(store.rglob("shard-*.npz"))) == 2 * 3


def test_sigkill_leaves_runs_that_doctor_finds_and_fixes_then_a_rerun_resumes(
        ref, tmp_path, monkeypatch, capsys):
    import saeuniv.extract as extract

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = _copy(ref["store"], tmp_path / "store", DOWNSTREAM)
    log = tmp_path / "run.log"
    args = ["run", *_args(ref["corpus"]), "--store", str(store)]
    n_shards = -(-len(Pipeline(ref["cfg"], Store(store)).a.windows.tokens) // SHARD_WINDOWS)
    stop = n_shards + 3  # A done, B three shards in
    proc = _signal_paused_run(args, log, uri, stop, signal.SIGKILL, -signal.SIGKILL)
    client, runs = _runs(uri)
    by = _by_stage(runs)
    assert {s: r.info.status for s, r in by.items()} == {
        "main": "RUNNING", "models": "FINISHED", "saes": "FINISHED", "extract": "RUNNING"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    doctor = ["doctor", "--store", str(store)]
    assert cli.main(doctor) == 1
    out = capsys.readouterr().out
    why = f"orphaned: process {proc.pid} on {hostname()} is gone"
    for stage in ("main", "extract"):
        assert f"ORPHANED run {by[stage].info.run_id}: {stage} run" in out and why in out
    assert out.count("ORPHANED") == 2 and "RESUMABLE" in out  # the shards are kept
    assert "doctor: 2 problem(s); run with --fix to repair them" in out
    assert cli.main(doctor + ["--fix"]) == 0
    assert "doctor: 2 problem(s), 2 fixed" in capsys.readouterr().out
    for stage in ("main", "extract"):
        run = client.get_run(by[stage].info.run_id)
        assert run.info.status == "FAILED" and run.data.tags["saeuniv.error"] == why
    kept = len(list(store.rglob("shard-*.npz")))
    assert kept == 3 * 3  # A finished, B's three layers part way
    saved = []
    real_save = extract._save_shard
    monkeypatch.setattr(extract, "_save_shard", lambda *a: (saved.append(a[0]), real_save(*a)))
    assert cli.main(args) == 0  # the same command again
    assert len(saved) == 3 * n_shards - kept
    _, runs = _runs(uri)
    rerun = [r for r in runs if r.data.tags["saeuniv.stage"] == "main"
             and r.info.status == "FINISHED"]
    assert len(rerun) == 1
    reference = _by_stage(_runs(ref["uri"], "det1")[1])["main"]
    assert _finite_equal(rerun[0].data.metrics, reference.data.metrics)
    assert _same_store(ref["store"], store, ["codes", "scores"]) == 11
    capsys.readouterr()
    assert cli.main(doctor) == 0
    assert "doctor: 0 problem(s)" in capsys.readouterr().out


def test_doctor_judges_runs_of_other_hosts_by_age_and_reused_pids(tracking):
    now = time.time()
    old, recent = int((now - 7200) * 1000), int((now - 60) * 1000)
    mine = owner_tags()
    assert orphan_reason(mine, old, 3600, now) is None  # this very process: alive
    reused = {**mine, "saeuniv.pid_start": str(int(mine["saeuniv.pid_start"]) + 1)}
    assert orphan_reason(reused, recent, 3600, now) == \
        f"orphaned: process {os.getpid()} on {hostname()} is gone"
    rebooted = {**mine, "saeuniv.boot_id": "00000000"}
    assert "the machine has restarted" in orphan_reason(rebooted, recent, 3600, now)
    remote = {"saeuniv.host": "elsewhere", "saeuniv.pid": "12"}
    assert orphan_reason(remote, recent, 3600, now) is None
    assert orphan_reason(remote, old, 3600, now).startswith(
        "orphaned: process 12 on elsewhere is gone (presumed")
    assert "no owning process" in orphan_reason({}, old, 3600, now)
    client = mlflow.MlflowClient(tracking)
    exp = client.create_experiment("doctor")
    main = {"saeuniv.stage": "main"}
    ids = {name: client.create_run(exp, start_time=t, tags=tags, run_name=name).info.run_id
           for name, t, tags in [("remote-old", old, {**main, **remote}),
                                 ("remote-new", recent, {**main, **remote}),
                                 ("alive", old, {**main, **mine}),
                                 ("sweep", old, {"saeuniv.stage": "sweep"}),
                                 ("not-ours", old, {})]}
    code = cli.main(["doctor", "--store", str(Path(os.environ["SAEUNIV_HOME"])),
                     "--stale-after", "1h", "--fix"])
    assert code == 0
    status = {n: client.get_run(i).info.status for n, i in ids.items()}
    assert status == {"remote-old": "FAILED", "remote-new": "RUNNING", "alive": "RUNNING",
                      "sweep": "RUNNING", "not-ours": "RUNNING"}
    assert cli.main(["doctor", "--stale-after", "soon"]) == 2


def test_doctor_cleans_the_store_and_never_touches_a_good_entry(ref, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # no runs
    store = _copy(ref["store"], tmp_path / "store")
    n_good = _visible_entries_whole(store)
    scores = sorted((store / "scores").glob("*/scores.json"))
    scores[0].write_text(scores[0].read_text().replace('"ok"', '"OK"'))  # a damaged entry
    sae = next(p for p in (store / "sae").iterdir() if p.is_dir())
    stray = store / "sae" / f".tmp-{sae.name}-deadbeef"  # a killed builder's folder
    shutil.copytree(sae, stray)
    busy_key = next(p for p in (store / "model").iterdir() if p.is_dir()).name
    busy = store / "model" / f".tmp-{busy_key}-cafef00d"  # a live builder's
    busy.mkdir()
    codes = next(p for p in (store / "codes").iterdir() if p.is_dir())
    leftover = Store(store).partial_path("codes", codes.name)  # shards of a finished entry
    leftover.mkdir(parents=True)
    (leftover / "shard-00000.npz").write_bytes(b"x")
    resumable = Store(store).partial_path("codes", "0" * 64)
    resumable.mkdir()
    (resumable / "shard-00000.npz").write_bytes(b"x")
    (resumable / ".shard-00001.npz.1234.tmp.npz").write_bytes(b"half")
    stale = Store(store).partial_path("codes", "1" * 64)
    stale.mkdir()
    (stale / "shard-00000.npz").write_bytes(b"x")
    week = time.time() - 8 * 86400
    for p in (stale, stale / "shard-00000.npz"):
        os.utime(p, (week, week))
    with FileLock(str(store / "model" / f"{busy_key}.lock")):
        found, n_ok = check_store(store, older_than=7 * 86400, fix=False)
        got = sorted((f.what, Path(f.where).name) for f in found)
        assert got == sorted([
            ("CORRUPT", scores[0].parent.name), ("STALE-TEMP", stray.name),
            ("BUSY", busy.name), ("LEFTOVER-PARTIAL", codes.name),
            ("STALE-TEMP", ".shard-00001.npz.1234.tmp.npz"), ("RESUMABLE", "0" * 64),
            ("STALE-PARTIAL", "1" * 64)])
        assert n_ok == n_good - 1
        assert "does not match its SHA-256" in next(f.detail for f in found
                                                    if f.what == "CORRUPT")
        assert cli.main(["doctor", "--store", str(store), "--fix"]) == 0
    out = capsys.readouterr().out
    assert "doctor: 5 problem(s), 5 fixed" in out and "runs not checked" in out
    assert not (tmp_path / "none.db").exists()
    assert busy.exists() and resumable.exists() and (resumable / "shard-00000.npz").exists()
    assert not stray.exists() and not leftover.exists() and not stale.exists()
    assert not scores[0].parent.exists() and list((store / "scores").glob("*.corrupt-*"))
    assert _visible_entries_whole(store) == n_good - 1  # every good entry still there, intact
    found, n_ok = check_store(store, older_than=7 * 86400, fix=False)
    assert n_ok == n_good - 1 and not [f for f in found if f.problem and f.what != "STALE-TEMP"]


# -- two runs at once ---------------------------------------------------------------------

def test_two_runs_at_once_share_the_store_and_build_each_entry_once(ref, tmp_path,
                                                                   monkeypatch):
    """Two `saeuniv run` started together on one cold store and one MLflow database: every
    store entry is built by one of them (the other waits on its lock and reuses it), every
    shard computed once, both runs FINISHED with the reference's metrics."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    mlflow.MlflowClient(uri).create_experiment("both")  # the database exists before the race
    store = tmp_path / "store"
    logs = [tmp_path / f"run{i}.log" for i in (1, 2)]
    # one CPU each: two processes of two torch threads on two cores would mostly wait on
    # each other's spinning threads (the results are the same bits with one thread or two)
    procs = [_start_cli(["run", *_args(ref["corpus"]), "--store", str(store), "--experiment",
                         "both"], log, cpu=i, MLFLOW_TRACKING_URI=uri)
             for i, log in enumerate(logs)]
    try:
        codes = [p.wait(400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    built = Counter(m for t in texts for m in re.findall(r"store: built (\w+/\w+) in", t))
    manifests = {f"{kind}/{key[:12]}" for kind, key in _entries(store, [
        p.name for p in store.iterdir() if p.is_dir()])}
    assert set(built) == manifests and set(built.values()) == {1}  # each entry built once
    print(f"\ntwo runs at once: {len(built)} entries built once each, "
          + " and ".join(f"{t.count('store: built ')} by run {i}" for i, t in enumerate(texts, 1)))
    computed = [tuple(map(int, m)) for t in texts
                for m in re.findall(r"computing (\d+) of (\d+) shards \((\d+) kept", t)]
    n_shards = -(-len(Pipeline(ref["cfg"], Store(store)).a.windows.tokens) // SHARD_WINDOWS)
    assert sum(c for c, _, _ in computed) == 5 * n_shards and all(k == 0 for *_, k in computed)
    _, runs = _runs(uri, "both")
    assert {r.info.status for r in runs} == {"FINISHED"}
    mains = [r for r in runs if r.data.tags["saeuniv.stage"] == "main"]
    kids = [r for r in runs if r.data.tags["saeuniv.stage"] != "subspaces.pair"]
    assert len(mains) == 2 and len(kids) == 2 * (1 + len(stages.NAMES))
    for sub in (r for r in kids if r.data.tags["saeuniv.stage"] == "subspaces"):
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sub.info.run_id]
        # a layer-pair run each, unless the stage reused the other run's finished stage
        assert len(children) == (0 if "saeuniv.reused_from" in sub.data.tags else 6)
    assert max(r.info.start_time for r in mains) < min(r.info.end_time for r in mains)  # at once
    print("  lock waits:", [t.count("store: waiting for another process") for t in texts])
    reference = _by_stage(_runs(ref["uri"], "det1")[1])["main"]
    assert _finite_equal(mains[0].data.metrics, mains[1].data.metrics)
    assert _finite_equal(mains[0].data.metrics, reference.data.metrics)
    assert _same_store(ref["store"], store, ["sae", "codes", "scores"]) == 16
