"""``saeuniv audit RUN_ID``: the provenance of a run, and whether its artefacts are intact.

Every run that ends FINISHED logs ``artifacts.sha256.json`` (size and SHA-256 of each
artefact, see ``tracking.log_checksums``). The audit prints the run's inputs (params and
lineage tags), its parent and children with their status, and each artefact with its size
and checksum, then fetches every recorded artefact again and compares. A missing or changed
artefact, or a missing checksum record, is named on its own line and makes the audit fail.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from .files import sha256_file
from .tracking import CHECKSUMS, artifact_paths


@dataclass
class AuditResult:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def _run_line(run) -> str:
    return (f"{run.info.run_id}  {run.info.status:<9} {run.data.tags.get('saeuniv.stage', '-'):<11}"
            f" {run.info.run_name}")


def audit(run_id: str) -> AuditResult:
    """Provenance and artefact check of one run (raises MlflowException for an unknown id)."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    out = AuditResult()
    add = out.lines.append
    tags = run.data.tags
    add(f"run {run_id}: {run.info.run_name} (stage {tags.get('saeuniv.stage', '-')}, "
        f"status {run.info.status}, experiment {run.info.experiment_id})")
    add(f"artifact root: {run.info.artifact_uri}")
    add("")
    add("## inputs: params")
    for k, v in sorted(run.data.params.items()):
        add(f"  {k} = {v}")
    add("## inputs: lineage tags")
    for k, v in sorted(tags.items()):
        if k.startswith("saeuniv."):
            add(f"  {k} = {v}")
    add("## parent")
    parent_id = tags.get("mlflow.parentRunId")
    if parent_id:
        try:
            add("  " + _run_line(client.get_run(parent_id)))
        except mlflow.exceptions.MlflowException:
            add(f"  {parent_id}  (no longer in the tracking store)")
    else:
        add("  none (a top-level run)")
    add("## children")
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    for child in children:
        add("  " + _run_line(child))
    if not children:
        add("  none")
    add("## artifacts (size, sha256)")
    present = {info.path for info in artifact_paths(client, run_id)}
    if CHECKSUMS not in present:
        out.problems.append(f"MISSING {CHECKSUMS}: no checksum record (the run did not end "
                            "FINISHED, or the record was removed)")
        for path in sorted(present):
            add(f"  {path}  (not checked)")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        record = json.loads(Path(client.download_artifacts(run_id, CHECKSUMS, tmp)).read_text())
        for path, want in sorted(record.items()):
            if path not in present:
                out.problems.append(f"MISSING {path}")
                add(f"  {path}  {want['size']:>10}  {want['sha256']}  MISSING")
                continue
            local = Path(client.download_artifacts(run_id, path, tmp))
            size, sha = local.stat().st_size, sha256_file(local)
            ok = sha == want["sha256"] and size == want["size"]
            if not ok:
                out.problems.append(f"CHANGED {path}: sha256 {sha} size {size}, recorded "
                                    f"{want['sha256']} size {want['size']}")
            add(f"  {path}  {size:>10}  {sha}  {'ok' if ok else 'CHANGED'}")
    for path in sorted(present - set(record) - {CHECKSUMS}):
        add(f"  {path}  (added after the checksum record; not checked)")
    return out


def main(run_id: str) -> int:
    """Print the audit; 0 when every recorded artefact is there and intact, else 1."""
    result = audit(run_id)
    print("\n".join(result.lines))
    print()
    for problem in result.problems:
        print(problem)
    print(f"audit: {'intact' if result.intact else 'NOT intact'}: "
          f"{len(result.problems)} problem(s)")
    return 0 if result.intact else 1
