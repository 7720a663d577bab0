"""Files written whole or not at all, their checksums, and the file locks that let
processes share a folder.

A file is written to a hidden temporary sibling (``.<name>.<random>.tmp``), flushed to disk
and renamed onto its name, so a crash leaves the old file or the new one, never a part.
Locks are OS file locks (``filelock``): the OS drops them when their process dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

HIDDEN = "."  # <dir>/.<name>.<rand>.tmp (temp_name): never a finished file


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
    return path.with_name(f"{HIDDEN}{path.name}.{uuid.uuid4().hex}{suffix}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is a hidden temporary one (:func:`temp_name`), never a
    finished file: the pieces of a partial folder and the files of an entry are not."""
    return name.startswith(HIDDEN)


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


def lock_held(path: Path) -> bool:
    """Whether a process holds the file lock at ``path`` (a builder holds its lock while
    it works, and the OS drops it when the process dies); a missing lock file is free."""
    if not Path(path).exists():
        return False
    try:
        with FileLock(str(path), timeout=0):
            return False
    except Timeout:
        return True
