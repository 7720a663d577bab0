"""Which process did it: host, boot, process id and start time, and whether it still runs.

A run or a sweep trial records who runs it; a later process on the same machine
tells a dead owner from a live one by its process id *and* its start time (a
process id can be reused), and a reboot by the boot id. Linux ``/proc``; where it
is missing a process that exists counts as alive.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def hostname() -> str:
    return socket.gethostname()


def machine_id() -> str:
    return f"{hostname()}:{boot_id()}"


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks after boot ("0" when unknown)."""
    stat = proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else "0"


def worker_id() -> str:
    """``host:boot:pid:start``: which process runs a trial, so a rerun on the same machine
    can tell a dead worker's trial from a live one's (the start time guards against a
    reused process id)."""
    return f"{machine_id()}:{os.getpid()}:{start_time(os.getpid())}"


def pid_alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``start`` ("0": any)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc: the process exists
    # an exited child nobody has reaped is dead too, and so is a reused process id
    return stat[0] != "Z" and (start == "0" or start_time(pid) == start)


def worker_gone(owner: str) -> bool:
    """True when ``owner`` (a worker id) ran on this machine and its process has ended.
    A worker on another machine is never judged here (the heartbeat does that)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    machine, pid, start = parts
    return machine == machine_id() and not pid_alive(int(pid), start)


def owner_tags() -> dict[str, str]:
    """MLflow tags naming this process: ``saeuniv.host``, ``saeuniv.boot_id``,
    ``saeuniv.pid`` and ``saeuniv.pid_start``, read by ``saeuniv doctor``."""
    pid = os.getpid()
    return {"saeuniv.host": hostname(), "saeuniv.boot_id": boot_id(), "saeuniv.pid": str(pid),
            "saeuniv.pid_start": start_time(pid)}
