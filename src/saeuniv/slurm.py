"""Slurm from its command-line tools: job states (``scontrol``, which needs no accounting
database), cancelling, and what each state means for an MLflow run.

``scontrol`` knows a job until ``MinJobAge`` (default 300 s) after it ends; ``sacct`` is
asked after that, where the cluster keeps accounting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

# a Slurm job state -> the MLflow run status it stands for (Slurm's JOB STATE CODES)
MLFLOW_STATUS = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESV_DEL_HOLD"), "SCHEDULED"),
    **dict.fromkeys(("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING"), "RUNNING"),
    "COMPLETED": "FINISHED",
    **dict.fromkeys(("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                     "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"), "FAILED"),
    "CANCELLED": "KILLED",
}
WHY = {
    "FAILED": "the job's command exited with an error",
    "TIMEOUT": "the job reached its time limit",
    "OUT_OF_MEMORY": "the job ran out of memory",
    "NODE_FAIL": "the job's node failed",
    "BOOT_FAIL": "the job's node failed to boot",
    "DEADLINE": "the job reached its deadline",
    "PREEMPTED": "the job was preempted",
    "CANCELLED": "the job was cancelled",
}
ENDED = {state for state, status in MLFLOW_STATUS.items()
         if status in ("FINISHED", "FAILED", "KILLED")}


class SlurmError(RuntimeError):
    """A Slurm command failed."""


@dataclass(frozen=True)
class JobState:
    """One job, or one task of a job array, as Slurm reports it."""

    job_id: str  # "123", or "123_4" for task 4 of array 123
    state: str  # e.g. RUNNING, TIMEOUT (CANCELLED by 0 is read as CANCELLED)
    reason: str = ""  # Slurm's Reason field ("None" dropped)
    exit_code: str = ""  # "0:0" (status:signal)
    restarts: int = 0

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def status(self) -> str:
        """The MLflow run status this state stands for (``RUNNING`` for one not listed)."""
        return MLFLOW_STATUS.get(self.state, "RUNNING")

    def why(self) -> str:
        """One line: the state, what it means, and Slurm's reason and exit code."""
        text = f"Slurm job {self.job_id} ended {self.state}"
        if self.state in WHY:
            text += f" ({WHY[self.state]})"
        details = [f"reason {self.reason}"] if self.reason else []
        if self.exit_code and self.exit_code != "0:0":
            details.append(f"exit code {self.exit_code}")
        return text + (f"; {', '.join(details)}" if details else "")


def check() -> None:
    """Raise ``SlurmError`` when Slurm's commands are not on PATH."""
    missing = [c for c in ("sbatch", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"Slurm's {', '.join(missing)} not on PATH; run on a cluster login "
                         "node (or a machine with the Slurm client and SLURM_CONF set)")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def states(job_id: str) -> list[JobState]:
    """Every record Slurm has of a job, or of each task of a job array (a block of
    pending array tasks expanded, one per task); empty once Slurm has forgotten it."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return _sacct(job_id)
        raise SlurmError(f"scontrol show job {job_id} failed: {out.stderr.strip()}")
    found = []
    for line in out.stdout.splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if not f:
            continue
        common = {"state": f.get("JobState", "UNKNOWN"),
                  "reason": "" if f.get("Reason") in (None, "None") else f["Reason"],
                  "exit_code": f.get("ExitCode", ""), "restarts": int(f.get("Restarts", 0))}
        if "ArrayJobId" in f and "ArrayTaskId" in f:
            found += [JobState(f"{f['ArrayJobId']}_{t}", **common)
                      for t in expand(f["ArrayTaskId"])]
        else:
            found.append(JobState(f.get("JobId", str(job_id)), **common))
    return found


def _sacct(job_id: str) -> list[JobState]:
    """The job's records from accounting, where the cluster keeps it (else empty)."""
    if shutil.which("sacct") is None:
        return []
    out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,Reason,ExitCode", "-j",
                str(job_id)])
    if out.returncode != 0:
        return []
    found = []
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            jid, state, reason, code = parts
            found.append(JobState(jid, state.split()[0],
                                  "" if reason == "None" else reason, code))
    return found


def expand(task_ids: str) -> list[int]:
    """``0-3,7%2`` -> [0, 1, 2, 3, 7]: an array's task ids as Slurm writes them."""
    out = []
    for part in task_ids.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo:
            out += list(range(int(lo), int(hi or lo) + 1))
    return out


def state(job_id: str) -> JobState | None:
    """The state of one job (not an array); None once Slurm has forgotten it."""
    found = [s for s in states(job_id) if s.job_id == str(job_id)]
    return found[0] if found else None


def cancel(job_ids: list[str]) -> None:
    """``scancel`` every job (a job array's id cancels all of its tasks)."""
    if job_ids:
        _run(["scancel", *map(str, job_ids)])


def children(parent: str) -> list[str]:
    """The ids of the queued jobs submitted from inside job ``parent`` (``comment_for``)."""
    out = _run(["squeue", "-h", "-o", "%F|%k"])
    mark = comment_for(parent)
    return sorted({line.split("|")[0] for line in out.stdout.splitlines()
                   if line.split("|")[-1] == mark})


def comment_for(parent: str) -> str:
    """The comment that marks a job as submitted from inside Slurm job ``parent``."""
    return f"saeuniv-parent={parent}"
