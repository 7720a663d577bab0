"""The content-keyed store: atomic entries, checksums, locks."""

import threading

import pytest

from saeuniv.store import Store, StoreError


def test_build_once_then_reuse(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(out):
        calls.append(1)
        (out / "x.txt").write_text("hello")
        return {"n": 1}

    e1, created1 = store.get_or_create("thing", {"a": 1}, build)
    e2, created2 = store.get_or_create("thing", {"a": 1}, build)
    assert (created1, created2) == (True, False)
    assert calls == [1]
    assert e2.meta == {"n": 1} and e2.file("x.txt").read_text() == "hello"
    e3, created3 = store.get_or_create("thing", {"a": 2}, build)
    assert created3 and e3.key != e1.key


def test_corrupt_entry_is_quarantined_and_rebuilt(tmp_path):
    store = Store(tmp_path)
    build = lambda out: (out / "x.txt").write_text("good") and None
    entry, _ = store.get_or_create("thing", {}, build)
    entry.file("x.txt").write_text("evil")
    assert store.get("thing", {}) is None          # checksum mismatch detected
    assert list((tmp_path / "thing").glob("*.corrupt-*"))  # kept aside, not deleted
    entry2, created = store.get_or_create("thing", {}, build)
    assert created and entry2.file("x.txt").read_text() == "good"


def test_failed_build_leaves_no_entry(tmp_path):
    store = Store(tmp_path)

    def build(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError, match="crash"):
        store.get_or_create("thing", {}, build)
    assert store.get("thing", {}) is None
    assert not [p for p in (tmp_path / "thing").iterdir() if not p.name.endswith(".lock")]


def test_concurrent_builders_compute_once(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(out):
        calls.append(1)
        (out / "x.txt").write_text("v")

    threads = [threading.Thread(target=store.get_or_create, args=("t", {"k": 1}, build))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_unwritable_store_is_named(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(StoreError, match="not writable.*SAEUNIV_HOME"):
        Store(target / "sub")


def test_forced_kind_is_rebuilt_once_and_overwritten(tmp_path):
    calls = []

    def build(out):
        calls.append(1)
        (out / "x.txt").write_text(f"build {len(calls)}")
        (out / "partial.txt").write_text("x") if len(calls) == 1 else None
        return {"n": len(calls)}

    Store(tmp_path).get_or_create("thing", {"a": 1}, build)
    Store(tmp_path).get_or_create("other", {"a": 1}, build)
    old_piece = Store(tmp_path).partial_dir("thing", {"a": 1}) / "shard-0"
    old_piece.write_text("stale")
    store = Store(tmp_path)
    store.force = {"thing"}
    assert store.get("thing", {"a": 1}) is None  # ignored while not rebuilt
    assert store.partial_dir("thing", {"a": 1}).exists() and not old_piece.exists()
    entry, created = store.get_or_create("thing", {"a": 1}, build)
    assert created and entry.meta == {"n": 3} and entry.file("x.txt").read_text() == "build 3"
    assert not entry.file("partial.txt").exists()  # overwritten, not merged
    again, created = store.get_or_create("thing", {"a": 1}, build)
    assert not created and again.meta == {"n": 3} and len(calls) == 3  # once per Store
    assert store.get_or_create("other", {"a": 1}, build)[1] is False  # other kinds kept
    assert Store(tmp_path).get("thing", {"a": 1}).meta == {"n": 3}
    assert not list((tmp_path / "thing").glob("*.corrupt-*"))
