"""A content-keyed artefact store.

Every artefact (corpus, tokenizer, model, SAE, codes, matches, scores) lives in
``<root>/<kind>/<key>/`` where ``key`` is the SHA-256 of the JSON spec that
produced it plus the store format and saeuniv version. An entry is built in a
temporary folder (``<kind>/.tmp-<key>-<random>``), described by ``manifest.json``
(spec, file sizes and SHA-256 checksums), flushed to disk and renamed into place,
so a crash at any point leaves either no entry (and a stray temporary folder that
``saeuniv doctor --fix`` removes) or a whole one. A per-key file lock
(``<kind>/<key>.lock``, an OS lock that dies with its process) makes concurrent
builders compute an entry once. An entry whose files no longer match their
manifest is moved aside (``<key>.corrupt-<time>``) and rebuilt.

The layout under the root is named by the constants below and made by :class:`Store`'s
methods alone: other modules ask the store for a path (:meth:`Store.partial_path`,
:meth:`Store.lock_path` ...) or for what is on disk (:meth:`Store.scan`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from filelock import FileLock, Timeout

from . import __version__, faults
from .config import digest
from .files import (
    HIDDEN,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    is_temp_name,
    locked,
    sha256_file,
)

log = logging.getLogger(__name__)

FORMAT = 2  # bump when a stage's output changes for the same spec

# the layout; nothing outside this module builds these names
MANIFEST = "manifest.json"   # <kind>/<key>/manifest.json: a finished entry's description
LOCK_SUFFIX = ".lock"        # <kind>/<key>.lock, partial/<kind>/<key>.lock
TMP_PREFIX = ".tmp-"         # <kind>/.tmp-<key>-<rand>/: an entry being built
OLD_PREFIX = ".old-"         # <kind>/.old-<key>-<rand>/: a forced entry being replaced
CORRUPT_MARK = ".corrupt-"   # <kind>/<key>.corrupt-<time>-<rand>/: moved aside
PROBE_PREFIX = ".probe-"     # .probe-<rand>: Store()'s write probe
PARTIAL = "partial"          # partial/<kind>/<key>/: pieces of an unfinished entry
SHARD_PREFIX = "shard-"      # partial/codes/<key>/shard-<i>.npz: extraction's pieces
MEMO = "memo"                # memo/<hash>.json: file_sha256's memory
NOT_KINDS = (PARTIAL, MEMO)  # folders of the root that hold no entries
KEY_LEN = 64                 # a key is a SHA-256 in hex


def default_root() -> Path:
    """``$SAEUNIV_HOME`` or ``~/.cache/saeuniv``."""
    return Path(os.environ.get("SAEUNIV_HOME", Path.home() / ".cache" / "saeuniv")).expanduser()


class StoreError(RuntimeError):
    """The store cannot be used (not writable, corrupt beyond repair)."""


class DiskSpaceError(ValueError):
    """The store's disk has too little free space for the planned artefacts."""


SKIP_DISK_CHECK_ENV = "SAEUNIV_SKIP_DISK_CHECK"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@dataclass(frozen=True)
class Entry:
    """A finished store entry."""

    kind: str
    key: str
    path: Path
    manifest: dict

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def file(self, name: str) -> Path:
        return self.path / name


def verify_entry(path: Path, quick: bool = False, manifest: dict | None = None) -> str | None:
    """What is wrong with the finished entry at ``path`` (whose ``manifest`` may be read
    already), or None when it matches its manifest (``quick``: file sizes only, no
    checksums)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text()) if manifest is None else manifest
    except FileNotFoundError:
        return f"no {MANIFEST} (not a finished entry)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    if manifest.get("key") not in (None, path.name):
        return f"its manifest describes key {manifest.get('key')}"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, its manifest says {info['size']}"
        if not quick and sha256_file(f) != info["sha256"]:
            return f"{name} does not match its SHA-256 checksum"
    return None


class What(Enum):
    """What a thing :meth:`Store.scan` finds is, by its name."""

    ENTRY = "entry"              # <kind>/<key>/: a finished entry or a folder posing as one
    BUILD = "build"              # <kind>/.tmp-<key>-<rand>/: never a finished entry
    REPLACED = "replaced"        # <kind>/.old-<key>-<rand>/: never a finished entry
    QUARANTINED = "quarantined"  # <kind>/<key>.corrupt-<time>-<rand>/
    TEMP = "temp"                # <kind>/.<name>.<rand>.tmp: a file being written
    MEMO_TEMP = "memo-temp"      # memo/.<name>.<rand>.tmp: a checksum being remembered
    PROBE = "probe"              # .probe-<rand>: Store()'s write probe, unless killed
    PARTIAL = "partial"          # partial/<kind>/<key>/: pieces of an unfinished entry
SHARD_PREFIX = "shard-"      # partial/codes/<key>/shard-<i>.npz: extraction's pieces


@dataclass(frozen=True)
class Found:
    """One thing on disk (:meth:`Store.scan`): what it is, where, and the kind, key and
    lock its name gives (None where it gives none, e.g. a build folder named without a
    key). The lock is the one its builder or writer holds while it works."""

    what: What
    path: Path
    kind: str | None = None
    key: str | None = None
    lock: Path | None = None


class Store:
    """Content-keyed, atomic, lock-protected artefact store rooted at ``root``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()
        # kinds to recompute: an existing entry of these kinds (and its partial pieces) is
        # ignored and overwritten by its first build through this Store object (--force)
        self.force: set[str] = set()
        self._rebuilt: set[tuple[str, str]] = set()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StoreError(
                f"store folder {self.root} is not writable ({err}); give a writable folder "
                "(--store DIR or SAEUNIV_HOME)") from None

    # -- the layout: every path the store uses is made here ---------------------------

    def key(self, kind: str, spec: dict) -> str:
        return digest({"kind": kind, "spec": spec, "format": FORMAT, "version": __version__})

    def entry_path(self, kind: str, key: str) -> Path:
        """The folder of the entry ``kind/key`` (there or not)."""
        return self.root / kind / key

    def lock_path(self, kind: str, key: str) -> Path:
        """The lock a builder of entry ``kind/key`` holds while it builds."""
        return self.root / kind / f"{key}{LOCK_SUFFIX}"

    def finished(self, kind: str, key: str) -> bool:
        """Whether the entry ``kind/key`` has its manifest, i.e. was renamed into place
        whole (not verified, whatever ``force`` says)."""
        return (self.entry_path(kind, key) / MANIFEST).exists()

    def _aside_path(self, prefix: str, kind: str, key: str) -> Path:
        """A new build folder (TMP_PREFIX) or replaced entry (OLD_PREFIX) of ``kind/key``."""
        return self.root / kind / f"{prefix}{key}-{uuid.uuid4().hex[:8]}"

    def partial_path(self, kind: str, key: str) -> Path:
        """The partial folder of entry ``kind/key`` (:meth:`partial_dir`), not created."""
        return self.root / PARTIAL / kind / key

    def partial_lock(self, kind: str, key: str) -> Path:
        """The lock held while a process writes pieces into ``partial_dir`` of ``kind/key``."""
        return self.root / PARTIAL / kind / f"{key}{LOCK_SUFFIX}"

    # -- reading and building entries -------------------------------------------------

    def free_bytes(self) -> int:
        """Free space on the store's disk, in bytes."""
        return shutil.disk_usage(self.root).free

    def check_space(self, planned: dict[str, tuple[int, str]], fix: str) -> None:
        """Raise DiskSpaceError when the store's disk has less free space than the
        ``planned`` artefacts need (``{kind: (bytes, how the estimate is made)}``) plus a
        10% margin. ``$SAEUNIV_SKIP_DISK_CHECK=1`` skips the check."""
        if os.environ.get(SKIP_DISK_CHECK_ENV) == "1":
            return
        need = int(sum(n for n, _ in planned.values()) * 1.1)
        free = self.free_bytes()
        if need <= free:
            return
        parts = "; ".join(f"{kind} {human_bytes(n)} ({how})" for kind, (n, how) in
                          planned.items() if n)
        raise DiskSpaceError(
            f"not enough disk space in the store {self.root}: the planned artefacts need about "
            f"{need:,} bytes ({human_bytes(need)}, with a 10% margin: {parts}) but {free:,} "
            f"bytes ({human_bytes(free)}) are free; {fix}, or use a store on a larger disk "
            f"(--store DIR or SAEUNIV_HOME); {SKIP_DISK_CHECK_ENV}=1 skips this check")

    def has(self, kind: str, spec: dict) -> bool:
        """Whether a finished entry for ``spec`` is there (not verified; False when forced)."""
        key = self.key(kind, spec)
        return self.finished(kind, key) and not self._forced(kind, key)

    def file_sha256(self, path: str | Path) -> str:
        """SHA-256 of a file outside the store, remembered by path, size and mtime.

        Large weight files are hashed once; a changed file is hashed again.
        """
        path = Path(path).resolve()
        st = path.stat()
        memo = self.root / MEMO / f"{digest(str(path))[:32]}.json"
        stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["sha256"]
        except (OSError, ValueError):
            pass
        sha = sha256_file(path)
        memo.parent.mkdir(exist_ok=True)
        atomic_write_text(memo, json.dumps({**stamp, "sha256": sha}))
        return sha

    def _forced(self, kind: str, key: str) -> bool:
        """Whether an existing entry must be ignored: its kind is forced, not rebuilt yet."""
        return kind in self.force and (kind, key) not in self._rebuilt

    def get(self, kind: str, spec: dict, verify: bool = True) -> Entry | None:
        """The finished entry for ``spec``, or None. Corrupt entries are moved aside."""
        key = self.key(kind, spec)
        path = self.entry_path(kind, key)
        manifest_path = path / MANIFEST
        if not manifest_path.exists() or self._forced(kind, key):
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            why = verify_entry(path, manifest=manifest) if verify else None
        except (ValueError, OSError) as err:
            why = str(err)
        if why is not None:
            self.quarantine(path, why)
            return None
        return Entry(kind, key, path, manifest)

    def quarantine(self, path: Path, why: str) -> Path | None:
        """Move a corrupt entry aside (``<key>.corrupt-<time>``); returns where it went."""
        dest = path.with_name(f"{path.name}{CORRUPT_MARK}{int(time.time())}-{uuid.uuid4().hex[:6]}")
        log.warning("store entry %s is corrupt (%s); moved to %s and rebuilding", path, why,
                    dest)
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # another process moved or replaced it first
            return None
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return None
        return dest

    def get_or_create(
        self, kind: str, spec: dict, build: Callable[[Path], dict | None]
    ) -> tuple[Entry, bool]:
        """Return ``(entry, created)``, calling ``build(tmp_dir)`` if no entry exists.

        ``build`` writes its files into ``tmp_dir`` and may return a ``meta`` dict
        stored in the manifest. Concurrent callers with the same spec wait on a lock
        and reuse the first one's result.
        """
        entry = self.get(kind, spec)
        if entry is not None:
            return entry, False
        key = self.key(kind, spec)
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path(kind, key), f"{kind}/{key[:12]}"):
            entry = self.get(kind, spec)
            if entry is not None:
                return entry, False
            manifest = self._build(kind, key, spec, build)
        log.info("store: built %s/%s in %.1fs", kind, key[:12], manifest["build_seconds"])
        return Entry(kind, key, self.entry_path(kind, key), manifest), True

    def _build(self, kind: str, key: str, spec: dict,
               build: Callable[[Path], dict | None]) -> dict:
        """Build entry ``kind/key`` in a temporary folder, then rename it into place (the
        caller holds its lock); returns the manifest."""
        tmp = self._aside_path(TMP_PREFIX, kind, key)
        tmp.mkdir()
        old = None
        try:
            t0 = time.time()
            meta = build(tmp) or {}
            manifest = _write_manifest(tmp, {"kind": kind, "key": key, "spec": spec,
                                             "meta": meta}, t0)
            faults.point("entry")
            final = self.entry_path(kind, key)
            if final.exists() and self._forced(kind, key):  # recomputed: replace it
                old = self._aside_path(OLD_PREFIX, kind, key)
                os.replace(final, old)
            elif final.exists():  # a folder with no valid manifest: never trust it
                self.quarantine(final, "no valid manifest")
            os.replace(tmp, final)
            fsync_dir(final.parent)
            self._rebuilt.add((kind, key))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return manifest

    # -- partial folders --------------------------------------------------------------

    def partial_dir(self, kind: str, spec: dict) -> Path:
        """A folder where a long build keeps finished pieces (e.g. code shards) until the
        entry is complete, so an interrupted build resumes instead of starting over."""
        key = self.key(kind, spec)
        path = self.partial_path(kind, key)
        if self._forced(kind, key) and (PARTIAL, kind, key) not in self._rebuilt:
            shutil.rmtree(path, ignore_errors=True)  # recompute every piece too
            self._rebuilt.add((PARTIAL, kind, key))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock_partial(self, kind: str, key: str, what: str):
        """Hold :meth:`partial_lock` of ``kind/key`` (a context manager, :func:`locked`)
        while writing pieces into its partial folder; ``what`` names the work in the log
        line of a process that waits for it."""
        lock = self.partial_lock(kind, key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        return locked(lock, what)

    def clear_partial(self, kind: str, key: str) -> None:
        """Remove the partial folder of ``kind/key`` and its files; the caller holds its
        lock (so a temporary file in it is a dead writer's). OSError if it cannot."""
        path = self.partial_path(kind, key)
        for f in path.iterdir():
            f.unlink()
        path.rmdir()

    def drop_partial(self, kind: str, key: str) -> bool:
        """Remove the partial folder of ``kind/key`` unless a process holds its lock (a
        kill between an entry's rename and this clean-up leaves the pieces of a finished
        entry). Returns whether it was removed; a failure to remove is not an error."""
        if not self.partial_path(kind, key).is_dir():
            return False
        try:
            with FileLock(str(self.partial_lock(kind, key)), timeout=0):
                self.clear_partial(kind, key)
        except (Timeout, OSError):
            return False
        return True

    # -- what is on disk --------------------------------------------------------------

    def scan(self) -> Iterator[Found]:
        """Everything under the root that the layout names, classified by its name:
        kind by kind, then partial folders, memo temporary files and write probes, each
        group sorted. Lock files, memo files and foreign files are left out. Whether a
        thing is busy, stale or corrupt is the caller's question."""
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if kind_dir.name not in NOT_KINDS:
                yield from self._scan_kind(kind_dir)
        partial = self.root / PARTIAL
        kind_dirs = sorted(p for p in partial.iterdir() if p.is_dir()) if partial.is_dir() else []
        for kind_dir in kind_dirs:
            for path in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
                kind, key = kind_dir.name, path.name
                yield Found(What.PARTIAL, path, kind, key, self.partial_lock(kind, key))
        memo = self.root / MEMO
        if memo.is_dir():
            yield from (Found(What.MEMO_TEMP, p) for p in sorted(memo.glob(f"{HIDDEN}*")))
        yield from (Found(What.PROBE, p) for p in sorted(self.root.glob(f"{PROBE_PREFIX}*")))

    def _scan_kind(self, kind_dir: Path) -> Iterator[Found]:
        kind = kind_dir.name
        for path in sorted(kind_dir.iterdir()):
            name = path.name
            if name.endswith(LOCK_SUFFIX):
                continue
            if name.startswith((TMP_PREFIX, OLD_PREFIX)):
                key = name[len(TMP_PREFIX):].split("-")[0]  # both prefixes are as long
                key = key if len(key) == KEY_LEN else None
                yield Found(What.REPLACED if name.startswith(OLD_PREFIX) else What.BUILD, path,
                            kind, key, key and self.lock_path(kind, key))
            elif CORRUPT_MARK in name:
                yield Found(What.QUARANTINED, path, kind, name.split(CORRUPT_MARK)[0])
            elif is_temp_name(name) and path.is_file():
                yield Found(What.TEMP, path, kind)
            elif path.is_dir():
                yield Found(What.ENTRY, path, kind, name)


def _write_manifest(tmp: Path, head: dict, t0: float) -> dict:
    """Describe the files built in ``tmp`` (sizes, SHA-256) in its manifest after ``head``
    (kind, key, spec, meta), then flush every file and folder to disk; returns it."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_file(p)
            files[str(p.relative_to(tmp))] = {"size": p.stat().st_size,
                                              "sha256": sha256_file(p)}
    manifest = {
        **head, "files": files,
        "saeuniv_version": __version__, "format": FORMAT, "created": time.time(),
        "build_seconds": round(time.time() - t0, 3),
        "built_by": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    for p in [tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        fsync_file(p) if p.is_file() else fsync_dir(p)
    return manifest
