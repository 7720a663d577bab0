"""``saeuniv doctor``: find what crashes left behind; with ``--fix``, clean it up.

MLflow runs: a run in state RUNNING whose process is gone. Every saeuniv run is
tagged at its start with the process that runs it (``saeuniv.host``,
``saeuniv.boot_id``, ``saeuniv.pid``, ``saeuniv.pid_start``). On this host the
run is orphaned when that process has ended, its id now belongs to a process that
started at another time, or the machine has rebooted since; on another host (or
with no owner tags) when it started longer than ``stale_after`` ago. ``--fix``
marks it FAILED with ``saeuniv.error=orphaned: process <pid> on <host> is gone``.
A sweep's parent run is left alone: the sweep itself closes it on its next run.

The store: temporary build folders (``<kind>/.tmp-*``, ``.old-*``) that no
builder holds the lock of; partial folders of an entry that is finished (left by
a kill between the entry's rename and the clean-up), or untouched for longer
than ``older_than``; temporary files no writer holds; and finished entries whose
files do not match their manifest (or that have none). ``--fix`` removes the
stray pieces and moves a bad entry aside (``<key>.corrupt-<time>``), as a read
of it would; a finished entry that matches its manifest is never touched. The
names are the store's (:meth:`Store.scan` tells what each thing is); this module
judges them: what is busy, stale or corrupt, what to say and what to fix.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .files import is_temp_name, lock_held
from .procs import boot_id, hostname, pid_alive
from .store import (  # verify_entry was defined here: doctor.verify_entry still works
    SHARD_PREFIX,
    Found,
    Store,
    StoreError,
    What,
    verify_entry,
)

TEMP_GRACE_S = 600  # a lock-free temporary file younger than this may still be written


@dataclass
class Finding:
    """One problem (or, with ``problem=False``, one thing worth knowing)."""

    what: str          # ORPHANED, STALE-TEMP, CORRUPT, LEFTOVER-PARTIAL, STALE-PARTIAL, ...
    where: str
    detail: str
    problem: bool = True
    fixed: str = ""    # what --fix did

    def line(self) -> str:
        return (f"{self.what} {self.where}: {self.detail}"
                + (f" [fixed: {self.fixed}]" if self.fixed else ""))


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``24h`` or ``7d``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- MLflow runs ----------------------------------------------------------------------

def orphan_reason(tags: dict, start_ms: int, stale_after: float,
                  now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags is orphaned, or None while its process may live."""
    now = time.time() if now is None else now
    host, pid = tags.get("saeuniv.host"), tags.get("saeuniv.pid")
    age = now - start_ms / 1000
    if host == hostname() and pid and pid.isdigit():
        gone = f"orphaned: process {pid} on {host} is gone"
        if tags.get("saeuniv.boot_id") not in (None, boot_id()):
            return gone + " (the machine has restarted since)"
        if not pid_alive(int(pid), tags.get("saeuniv.pid_start") or "0"):
            return gone
        return None
    if age <= stale_after:
        return None
    if host and pid:
        return (f"orphaned: process {pid} on {host} is gone (presumed: another host, started "
                f"{_age(age)} ago, over --stale-after {_age(stale_after)})")
    return (f"orphaned: no owning process recorded, started {_age(age)} ago (over "
            f"--stale-after {_age(stale_after)})")


def check_runs(client, stale_after: float, fix: bool) -> list[Finding]:
    """RUNNING saeuniv runs, in every active experiment, whose process is gone."""
    out = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return out
    token = None
    while True:
        page = client.search_runs(experiments, "attributes.status = 'RUNNING'",
                                  max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            stage = tags.get("saeuniv.stage")
            if stage is None or stage == "sweep":  # not ours, or closed by the sweep itself
                continue
            why = orphan_reason(tags, run.info.start_time, stale_after)
            if why is None:
                continue
            f = Finding("ORPHANED", f"run {run.info.run_id}",
                        f"{stage} run, experiment {run.info.experiment_id}: {why}")
            if fix:
                client.set_tag(run.info.run_id, "saeuniv.error", why)
                client.set_terminated(run.info.run_id, "FAILED")
                f.fixed = "marked FAILED"
            out.append(f)
        token = page.token
        if not token:
            return out


# -- the store ------------------------------------------------------------------------

def _newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")]
    return max(times)


def _remover(path: Path):
    """The fix that removes ``path`` (a file or a folder)."""
    def remove() -> str:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return "removed"
    return remove


class _Findings:
    """The findings of one check of a store, fixed as they are found when ``fix``."""

    def __init__(self, fix: bool):
        self.fix, self.out, self.n_ok = fix, [], 0

    def add(self, what: str, path: Path, detail: str, fixer=None, problem: bool = True):
        f = Finding(what, str(path), detail, problem)
        if self.fix and fixer is not None:
            f.fixed = fixer()
        self.out.append(f)

    def stale(self, path: Path, detail: str) -> None:
        """A stray piece that ``--fix`` removes."""
        self.add("STALE-TEMP", path, detail, _remover(path))


def _judge_build(thing: Found, found: _Findings, now: float) -> None:
    """A build folder (or a replaced entry's): busy while its builder holds the lock; else
    stale, at once when its name gives the lock, after TEMP_GRACE_S when it does not."""
    if thing.lock is not None and lock_held(thing.lock):
        found.add("BUSY", thing.path, "a build in progress (its lock is held)", problem=False)
    elif thing.lock is not None or now - _newest_mtime(thing.path) > TEMP_GRACE_S:
        found.stale(thing.path, "the temporary folder of an interrupted build (no process "
                    "holds its lock); never a finished entry")


def _judge_entry(store: Store, thing: Found, found: _Findings, quick: bool) -> None:
    """A finished entry: intact, or CORRUPT (``--fix`` moves it aside, as a read would)."""
    try:
        why = verify_entry(thing.path, quick)
    except FileNotFoundError:  # replaced or moved by a concurrent process
        return
    if why is None:
        found.n_ok += 1
        return

    def quarantine():
        dest = store.quarantine(thing.path, why)
        return f"moved to {dest.name}" if dest else "already gone"
    found.add("CORRUPT", thing.path, why + "; a run would move it aside and rebuild it",
              quarantine)


def _judge_partial(store: Store, thing: Found, found: _Findings, now: float,
                   older_than: float) -> None:
    """A partial folder: busy while its writer holds the lock; left over when its entry is
    finished; stale when untouched for ``older_than``; else resumable (its temporary
    files, of a dead writer since no one holds the lock, are stale)."""
    path, kind, key = thing.path, thing.kind, thing.key
    if lock_held(thing.lock):
        found.add("BUSY", path, "an extraction in progress (its lock is held)", problem=False)
        return
    pieces = sorted(p.name for p in path.iterdir())
    shards = [p for p in pieces if p.startswith(SHARD_PREFIX)]
    age = now - _newest_mtime(path)
    remove = _remover(path)
    if store.finished(kind, key):
        found.add("LEFTOVER-PARTIAL", path, f"the entry {kind}/{key[:12]} is finished; "
                  f"{len(pieces)} leftover piece(s)", remove)
    elif age > older_than:
        found.add("STALE-PARTIAL", path, f"{len(shards)} shard(s) of an interrupted "
                  f"extraction, untouched for {_age(age)} (over --older-than "
                  f"{_age(older_than)}); a rerun of the same config would resume from them",
                  remove)
    else:
        for name in filter(is_temp_name, pieces):
            found.stale(path / name, "a shard file its writer never finished (no process "
                        "holds the folder's lock)")
        found.add("RESUMABLE", path, f"{len(shards)} shard(s) of an interrupted "
                  f"extraction, {_age(age)} old: rerun the same command to resume",
                  problem=False)


def _judge_file(thing: Found, found: _Findings, now: float) -> None:
    """A temporary file or a write probe: stale once older than TEMP_GRACE_S (before,
    its writer may still be at work: these have no lock)."""
    if now - thing.path.stat().st_mtime > TEMP_GRACE_S:
        found.stale(thing.path, "a write probe of an interrupted start"
                    if thing.what is What.PROBE else "a temporary file of an interrupted write")


def check_store(root: Path, older_than: float, fix: bool, now: float | None = None,
                quick: bool = False) -> tuple[list[Finding], int]:
    """Stray temporary pieces, stale partial folders and entries that do not match their
    manifest, judged thing by thing as :meth:`Store.scan` finds them. Returns the
    findings and the number of entries verified intact."""
    now = time.time() if now is None else now
    store = Store(root)
    found = _Findings(fix)
    for thing in store.scan():
        if thing.what in (What.BUILD, What.REPLACED):
            _judge_build(thing, found, now)
        elif thing.what is What.QUARANTINED:
            found.add("QUARANTINED", thing.path, "a corrupt entry moved aside earlier; "
                      "inspect, then delete it", problem=False)
        elif thing.what is What.ENTRY:
            _judge_entry(store, thing, found, quick)
        elif thing.what is What.PARTIAL:
            _judge_partial(store, thing, found, now, older_than)
        else:  # TEMP, MEMO_TEMP, PROBE
            _judge_file(thing, found, now)
    return found.out, found.n_ok


def doctor(store_root: Path | None, tracking_uri: str | None, fix: bool = False,
           stale_after: float = 86400.0, older_than: float = 7 * 86400.0,
           quick: bool = False) -> tuple[int, str]:
    """Check the MLflow runs at ``tracking_uri`` and the store at ``store_root`` (either
    may be None to skip it). Returns (exit status, report): 0 when nothing is wrong or
    everything found was fixed, 1 otherwise."""
    lines, findings = [], []
    if tracking_uri is not None:
        import mlflow

        runs = check_runs(mlflow.MlflowClient(tracking_uri), stale_after, fix)
        findings += runs
        lines.append(f"runs ({tracking_uri}): {len(runs)} orphaned")
    if store_root is not None:
        if not Path(store_root).is_dir():
            lines.append(f"store ({store_root}): does not exist")
        else:
            try:
                found, n_ok = check_store(Path(store_root), older_than, fix, quick=quick)
            except StoreError as err:
                return 1, f"saeuniv doctor: {err}"
            findings += found
            lines.append(f"store ({store_root}): {n_ok} entries intact"
                         + (" (sizes checked, --quick)" if quick else "") + ", "
                         f"{sum(f.problem for f in found)} problem(s)")
    problems = [f for f in findings if f.problem]
    unfixed = [f for f in problems if not f.fixed]
    body = [f.line() for f in findings]
    summary = (f"doctor: {len(problems)} problem(s)"
               + (f", {len(problems) - len(unfixed)} fixed" if fix else
                  ("; run with --fix to repair them" if problems else "")))
    return (1 if unfixed else 0), "\n".join(body + lines + [summary])
