"""``saeuniv doctor`` on a hand-made store: every finding, its message and its fix.

The store holds one of each thing a crash or a concurrent process leaves behind, with
chosen modification times, so the report is exact. (test_crash.py runs the doctor on a
real store left by killed processes.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from saeuniv.doctor import check_store, doctor, verify_entry
from saeuniv.files import temp_name
from saeuniv.store import Store

DAY = 86400.0
KEY = {c: c * 64 for c in "0123456789abcdef"}  # made-up keys of 64 hex digits


def _age(path: Path, seconds: float, now: float) -> None:
    """Set the modification time of ``path`` and everything in it to ``seconds`` before now."""
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (now - seconds, now - seconds))


def _entry(store: Store, kind: str, spec: dict, text: str = "x"):
    return store.get_or_create(kind, spec, lambda out: (out / "f.txt").write_text(text)
                               and None)[0]


@pytest.fixture()
def world(tmp_path):
    """A store with one of each: good and bad entries, build folders (busy, stale, young),
    a quarantined entry, temporary files, partial folders, a memo temp file and a probe."""
    now = time.time()
    store = Store(tmp_path / "store")
    root = store.root
    good = _entry(store, "thing", {"a": 1})
    bad = _entry(store, "thing", {"a": 2})
    (bad.path / "f.txt").write_text("y")  # same size, other bytes
    no_manifest = root / "thing" / KEY["1"]
    no_manifest.mkdir()
    stale_tmp = root / "thing" / f".tmp-{KEY['2']}-deadbeef"
    stale_tmp.mkdir()
    busy_tmp = root / "thing" / f".tmp-{KEY['3']}-cafef00d"
    busy_tmp.mkdir()
    stale_old = root / "thing" / f".old-{KEY['4']}-0badf00d"
    stale_old.mkdir()
    young_odd = root / "thing" / ".tmp-short-1234"  # no key in its name, young: left alone
    young_odd.mkdir()
    old_odd = root / "thing" / ".tmp-short-5678"
    old_odd.mkdir()
    _age(old_odd, 700, now)
    quarantined = store.quarantine(_entry(store, "thing", {"a": 3}).path, "made up")
    young_file = temp_name(root / "thing" / "x.json")
    young_file.write_text("half")
    old_file = temp_name(root / "thing" / "y.json")
    old_file.write_text("half")
    _age(old_file, 700, now)
    (root / "thing" / "README").write_text("not the store's")  # ignored

    leftover = store.partial_dir("thing", {"a": 1})  # of the finished entry `good`
    (leftover / "shard-00000.npz").write_bytes(b"x")
    stale = store.partial_dir("thing", {"p": "stale"})
    (stale / "shard-00000.npz").write_bytes(b"x")
    (stale / "layout.json").write_text("{}")
    _age(stale, 8 * DAY, now)
    resumable = store.partial_dir("thing", {"p": "resumable"})
    (resumable / "shard-00000.npz").write_bytes(b"x")
    (resumable / "shard-00001.npz").write_bytes(b"x")
    half = resumable / ".shard-00002.npz.1234.tmp.npz"
    half.write_bytes(b"half")
    _age(resumable, 3600, now)
    busy_partial = store.partial_dir("thing", {"p": "busy"})
    (busy_partial / "shard-00000.npz").write_bytes(b"x")

    memo_old = root / "memo" / ".abc.json.1.tmp"
    memo_old.parent.mkdir()
    memo_old.write_text("{")
    _age(memo_old, 700, now)
    memo_young = root / "memo" / ".def.json.2.tmp"
    memo_young.write_text("{")
    probe = root / ".probe-0123"
    probe.write_bytes(b"")
    _age(probe, 700, now)
    return {k: v for k, v in locals().items() if k not in ("tmp_path",)}


def _report(w, fix: bool):
    locks = [w["store"].lock_path("thing", KEY["3"]),
             w["store"].partial_lock("thing", w["busy_partial"].name)]
    with FileLock(str(locks[0])), FileLock(str(locks[1])):
        return check_store(w["root"], older_than=7 * DAY, fix=fix, now=w["now"])


def _expected(w) -> list[str]:
    return [
        (f"CORRUPT {w['bad'].path}: f.txt does not match its SHA-256 checksum; a run would move "
         "it aside and rebuild it"),
        (f"CORRUPT {w['no_manifest']}: no manifest.json (not a finished entry); a run would move "
         "it aside and rebuild it"),
        (f"STALE-TEMP {w['stale_tmp']}: the temporary folder of an interrupted build (no process "
         "holds its lock); never a finished entry"),
        f"BUSY {w['busy_tmp']}: a build in progress (its lock is held)",
        (f"STALE-TEMP {w['stale_old']}: the temporary folder of an interrupted build (no process "
         "holds its lock); never a finished entry"),
        (f"STALE-TEMP {w['old_odd']}: the temporary folder of an interrupted build (no process "
         "holds its lock); never a finished entry"),
        (f"QUARANTINED {w['quarantined']}: a corrupt entry moved aside earlier; inspect, then "
         "delete it"),
        f"STALE-TEMP {w['old_file']}: a temporary file of an interrupted write",
        (f"LEFTOVER-PARTIAL {w['leftover']}: the entry thing/{w['leftover'].name[:12]} is "
         "finished; 1 leftover piece(s)"),
        (f"STALE-PARTIAL {w['stale']}: 1 shard(s) of an interrupted extraction, untouched for "
         "8.0d (over --older-than 7.0d); a rerun of the same config would resume from them"),
        (f"STALE-TEMP {w['half']}: a shard file its writer never finished (no process holds the "
         "folder's lock)"),
        (f"RESUMABLE {w['resumable']}: 2 shard(s) of an interrupted extraction, 1.0h old: rerun "
         "the same command to resume"),
        f"BUSY {w['busy_partial']}: an extraction in progress (its lock is held)",
        f"STALE-TEMP {w['memo_old']}: a temporary file of an interrupted write",
        f"STALE-TEMP {w['probe']}: a write probe of an interrupted start",
    ]


def _sorted_like(lines: list[str], expected: list[str]) -> list[str]:
    """``lines`` in the order of ``expected`` where both hold a line (the order of the
    entries' and the partial folders' random keys is not the order of this list)."""
    return sorted(lines, key=lambda s: expected.index(s) if s in expected else -1)


def test_doctor_reports_each_thing_in_a_store_with_its_message(world):
    found, n_ok = _report(world, fix=False)
    expected = _expected(world)
    assert _sorted_like([f.line() for f in found], expected) == expected
    assert n_ok == 1  # the good entry; the quarantined one is not counted
    assert sorted(f.what for f in found if not f.problem) == [
        "BUSY", "BUSY", "QUARANTINED", "RESUMABLE"]


def test_doctor_fix_removes_stray_pieces_and_moves_bad_entries_aside(world):
    w = world
    found, _ = _report(w, fix=True)
    fixed = {Path(f.where).name: f.fixed for f in found if f.fixed}
    gone = ["stale_tmp", "stale_old", "old_odd", "old_file", "leftover", "stale", "half",
            "memo_old", "probe"]
    assert fixed == {**{w[k].name: "removed" for k in gone},
                     w["bad"].path.name: fixed[w["bad"].path.name],
                     w["no_manifest"].name: fixed[w["no_manifest"].name]}
    for k in gone:
        assert not w[k].exists(), k
    for k in ("busy_tmp", "young_odd", "quarantined", "young_file", "resumable", "busy_partial",
              "memo_young"):
        assert w[k].exists(), k
    assert (w["resumable"] / "shard-00001.npz").exists()
    assert w["good"].path.exists() and verify_entry(w["good"].path) is None
    for k in ("bad", "no_manifest"):
        path = w[k].path if k == "bad" else w[k]
        assert not path.exists()
        assert fixed[path.name].startswith(f"moved to {path.name}.corrupt-")
        assert (path.parent / fixed[path.name][len("moved to "):]).is_dir()


def test_doctor_exit_status_and_summary(world):
    w = world
    status, text = doctor(w["root"], None, fix=False, older_than=7 * DAY)
    # no lock held: the build folder `busy_tmp` is stale too, `busy_partial` resumable
    assert status == 1
    assert text.splitlines()[-2:] == [
        f"store ({w['root']}): 1 entries intact, 12 problem(s)",
        "doctor: 12 problem(s); run with --fix to repair them"]
    assert f"STALE-TEMP {w['busy_tmp']}: " in text and f"RESUMABLE {w['busy_partial']}: " in text
    status, text = doctor(w["root"], None, fix=True, older_than=7 * DAY)
    assert status == 0 and text.endswith("doctor: 12 problem(s), 12 fixed")
    status, text = doctor(w["root"], None, quick=True)
    assert status == 0 and text.splitlines()[-2:] == [
        f"store ({w['root']}): 1 entries intact (sizes checked, --quick), 0 problem(s)",
        "doctor: 0 problem(s)"]
    assert doctor(w["root"] / "nowhere", None) == (
        0, f"store ({w['root'] / 'nowhere'}): does not exist\ndoctor: 0 problem(s)")
