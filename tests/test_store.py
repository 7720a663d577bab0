"""The content-keyed store: atomic entries, checksums, locks."""

import threading

import pytest
from filelock import FileLock

from saeuniv.files import is_temp_name, lock_held, temp_name
from saeuniv.store import Found, Store, StoreError, What, verify_entry


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
    build = _build("good")
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


# -- the layout: paths asked of the store, what is on disk classified -------------------

def _build(text):
    def build(out):
        (out / "x.txt").write_text(text)
    return build


def test_scan_classifies_one_of_each_thing_in_order(tmp_path):
    """Store.scan names what every file and folder is (by its name alone), kind by kind,
    then partial folders, memo temporary files and probes; locks and foreign files are
    left out."""
    store = Store(tmp_path)
    entry, _ = store.get_or_create("thing", {"a": 1}, _build("x"))
    other, _ = store.get_or_create("other", {"a": 1}, _build("y"))
    bad, _ = store.get_or_create("thing", {"a": 2}, _build("z"))
    moved = store.quarantine(bad.path, "made up")
    k = entry.key
    build = store.root / "thing" / f".tmp-{k}-0123abcd"
    replaced = store.root / "thing" / f".old-{k}-4567abcd"
    odd = store.root / "thing" / ".tmp-nokey-89ab"
    for p in (build, replaced, odd):
        p.mkdir()
    temp = temp_name(store.root / "thing" / "x.json")
    temp.write_text("half")
    (store.root / "thing" / "README").write_text("not the store's")
    partial = store.partial_dir("thing", {"a": 3})
    pkey = partial.name
    with store.lock_partial("thing", pkey, "a test"):  # leaves partial/thing/<key>.lock
        pass
    (tmp_path / "weights.bin").write_bytes(b"w")
    store.file_sha256(tmp_path / "weights.bin")  # memo/<hash>.json: not reported
    memo_temp = temp_name(store.root / "memo" / "y.json")
    memo_temp.write_text("{")
    probe = store.root / ".probe-abc"
    probe.write_bytes(b"")
    thing = sorted([Found(What.ENTRY, entry.path, "thing", k),
                    Found(What.QUARANTINED, moved, "thing", bad.key),
                    Found(What.BUILD, build, "thing", k, store.lock_path("thing", k)),
                    Found(What.REPLACED, replaced, "thing", k, store.lock_path("thing", k)),
                    Found(What.BUILD, odd, "thing"), Found(What.TEMP, temp, "thing")],
                   key=lambda f: f.path.name)
    assert list(store.scan()) == [
        Found(What.ENTRY, other.path, "other", other.key), *thing,
        Found(What.PARTIAL, partial, "thing", pkey, store.partial_lock("thing", pkey)),
        Found(What.MEMO_TEMP, memo_temp), Found(What.PROBE, probe)]
    assert store.partial_lock("thing", pkey).exists()
    assert all(f.path.exists() for f in store.scan())


def test_paths_of_the_layout(tmp_path):
    """The names other modules and the crash tests rely on stay what they were."""
    store = Store(tmp_path)
    entry, _ = store.get_or_create("thing", {"a": 1}, _build("x"))
    key = entry.key
    assert entry.path == store.entry_path("thing", key) == tmp_path / "thing" / key
    assert (entry.path / "manifest.json").is_file() and store.finished("thing", key)
    assert not store.finished("thing", "0" * 64)
    assert store.lock_path("thing", key) == tmp_path / "thing" / f"{key}.lock"
    assert store.partial_path("thing", key) == tmp_path / "partial" / "thing" / key
    assert not store.partial_path("thing", key).exists()  # not made by asking
    assert store.partial_dir("thing", {"a": 1}) == store.partial_path("thing", key)
    assert store.partial_lock("thing", key) == tmp_path / "partial" / "thing" / f"{key}.lock"
    moved = store.quarantine(entry.path, "made up")
    assert moved.parent == entry.path.parent and moved.name.startswith(f"{key}.corrupt-")
    assert is_temp_name(temp_name(tmp_path / "x").name) and not is_temp_name("shard-00000.npz")


def test_drop_partial_removes_a_folder_unless_its_lock_is_held(tmp_path):
    store = Store(tmp_path)
    keys = [store.key("thing", {"a": i}) for i in range(2)]
    for i, _key in enumerate(keys):
        (store.partial_dir("thing", {"a": i}) / "shard-00000.npz").write_bytes(b"x")
    with FileLock(str(store.partial_lock("thing", keys[1]))):
        assert lock_held(store.partial_lock("thing", keys[1]))
        assert store.drop_partial("thing", keys[0]) is True
        assert store.drop_partial("thing", keys[1]) is False  # a writer is at work
    assert not store.partial_path("thing", keys[0]).exists()
    assert (store.partial_path("thing", keys[1]) / "shard-00000.npz").exists()
    assert not lock_held(store.partial_lock("thing", keys[1]))
    assert not lock_held(tmp_path / "no.lock")
    assert store.drop_partial("thing", "0" * 64) is False  # nothing there
    with store.lock_partial("thing", keys[1], "a test"):  # the holder clears it itself
        store.clear_partial("thing", keys[1])
    assert not store.partial_path("thing", keys[1]).exists()


def test_verify_entry_names_what_is_wrong(tmp_path):
    store = Store(tmp_path)
    entry, _ = store.get_or_create("thing", {"a": 1}, _build("hello"))
    assert verify_entry(entry.path) is None
    entry.file("x.txt").write_text("HELLO")
    assert verify_entry(entry.path, quick=True) is None  # same size
    assert verify_entry(entry.path) == "x.txt does not match its SHA-256 checksum"
    entry.file("x.txt").write_text("hi")
    assert verify_entry(entry.path, quick=True) == \
        "x.txt has 2 bytes, its manifest says 5"
    entry.file("x.txt").unlink()
    assert verify_entry(entry.path) == "x.txt is missing"
    assert store.get("thing", {"a": 1}) is None  # a read moves it aside the same way
    assert [f.what for f in store.scan()] == [What.QUARANTINED]
    assert verify_entry(tmp_path) == "no manifest.json (not a finished entry)"
