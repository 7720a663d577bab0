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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from . import __version__, faults
from .config import digest

log = logging.getLogger(__name__)

FORMAT = 2  # bump when a stage's output changes for the same spec
MANIFEST = "manifest.json"


def default_root() -> Path:
    """``$SAEUNIV_HOME`` or ``~/.cache/saeuniv``."""
    return Path(os.environ.get("SAEUNIV_HOME", Path.home() / ".cache" / "saeuniv")).expanduser()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden temporary sibling of ``path``: ``.<name>.<random><suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp"):
    """Open a temporary sibling of ``path`` for binary writing; on a clean exit it is
    flushed to disk and renamed onto ``path``, on an error removed. A crash leaves the old
    file or the new one, never a part."""
    path = Path(path)
    tmp = temp_name(path, suffix)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def locked(path: Path, what: str):
    """Hold the file lock at ``path``; say so in the log when another process holds it."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("store: waiting for another process to finish %s", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StoreError(
                f"store folder {self.root} is not writable ({err}); give a writable folder "
                "(--store DIR or SAEUNIV_HOME)") from None

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
            f"{need:,} bytes ({human_bytes(need)}, with a 10% margin: {parts}) but {free:,} bytes "
            f"({human_bytes(free)}) are free; {fix}, or use a store on a larger disk (--store "
            f"DIR or SAEUNIV_HOME); {SKIP_DISK_CHECK_ENV}=1 skips this check")

    def has(self, kind: str, spec: dict) -> bool:
        """Whether a finished entry for ``spec`` is there (not verified; False when forced)."""
        key = self.key(kind, spec)
        return (self._dir(kind, key) / MANIFEST).exists() and not self._forced(kind, key)

    def file_sha256(self, path: str | Path) -> str:
        """SHA-256 of a file outside the store, remembered by path, size and mtime.

        Large weight files are hashed once; a changed file is hashed again.
        """
        path = Path(path).resolve()
        st = path.stat()
        memo = self.root / "memo" / f"{digest(str(path))[:32]}.json"
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

    def partial_dir(self, kind: str, spec: dict) -> Path:
        """A folder where a long build keeps finished pieces (e.g. code shards) until the
        entry is complete, so an interrupted build resumes instead of starting over."""
        key = self.key(kind, spec)
        path = self.root / "partial" / kind / key
        if self._forced(kind, key) and ("partial", kind, key) not in self._rebuilt:
            shutil.rmtree(path, ignore_errors=True)  # recompute every piece too
            self._rebuilt.add(("partial", kind, key))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def partial_lock(self, kind: str, key: str) -> Path:
        """The lock held while a process writes pieces into ``partial_dir`` of ``kind/key``."""
        return self.root / "partial" / kind / f"{key}.lock"

    def _forced(self, kind: str, key: str) -> bool:
        """Whether an existing entry must be ignored: its kind is forced, not rebuilt yet."""
        return kind in self.force and (kind, key) not in self._rebuilt

    def key(self, kind: str, spec: dict) -> str:
        return digest({"kind": kind, "spec": spec, "format": FORMAT, "version": __version__})

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, spec: dict, verify: bool = True) -> Entry | None:
        """The finished entry for ``spec``, or None. Corrupt entries are moved aside."""
        key = self.key(kind, spec)
        path = self._dir(kind, key)
        manifest_path = path / MANIFEST
        if not manifest_path.exists() or self._forced(kind, key):
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if verify:
                self._verify(path, manifest)
        except (ValueError, OSError, StoreError) as err:
            self.quarantine(path, str(err))
            return None
        return Entry(kind, key, path, manifest)

    def _verify(self, path: Path, manifest: dict) -> None:
        for name, info in manifest["files"].items():
            f = path / name
            if not f.exists():
                raise StoreError(f"{f} is missing")
            if f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
                raise StoreError(f"{f} does not match its checksum")

    def quarantine(self, path: Path, why: str) -> Path | None:
        """Move a corrupt entry aside (``<key>.corrupt-<time>``); returns where it went."""
        dest = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{uuid.uuid4().hex[:6]}")
        log.warning("store entry %s is corrupt (%s); moved to %s and rebuilding", path, why, dest)
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # another process moved or replaced it first
            return None
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return None
        return dest

    def lock_path(self, kind: str, key: str) -> Path:
        """The lock a builder of entry ``kind/key`` holds while it builds."""
        return self.root / kind / f"{key}.lock"

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
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path(kind, key), f"{kind}/{key[:12]}"):
            entry = self.get(kind, spec)
            if entry is not None:
                return entry, False
            tmp = kind_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            old = None
            try:
                t0 = time.time()
                meta = build(tmp) or {}
                files = {}
                for p in sorted(tmp.rglob("*")):
                    if p.is_file():
                        fsync_file(p)
                        files[str(p.relative_to(tmp))] = {"size": p.stat().st_size,
                                                          "sha256": sha256_file(p)}
                manifest = {
                    "kind": kind, "key": key, "spec": spec, "meta": meta, "files": files,
                    "saeuniv_version": __version__, "format": FORMAT, "created": time.time(),
                    "build_seconds": round(time.time() - t0, 3),
                    "built_by": {"host": socket.gethostname(), "pid": os.getpid()},
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                for p in [tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
                    fsync_file(p) if p.is_file() else fsync_dir(p)
                faults.point("entry")
                final = self._dir(kind, key)
                if final.exists() and self._forced(kind, key):  # recomputed: replace it
                    old = kind_dir / f".old-{key}-{uuid.uuid4().hex[:8]}"
                    os.replace(final, old)
                elif final.exists():  # a folder with no valid manifest: never trust it
                    self.quarantine(final, "no valid manifest")
                os.replace(tmp, final)
                fsync_dir(kind_dir)
                self._rebuilt.add((kind, key))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("store: built %s/%s in %.1fs", kind, key[:12], manifest["build_seconds"])
        return Entry(kind, key, self._dir(kind, key), manifest), True
