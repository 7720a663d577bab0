"""The keys a sweep writes into its Optuna study: what every worker reads back.

Workers on several machines and reruns months later find each other through these
attributes, so their names are a storage format: renaming one orphans the studies
that already hold it.
"""

from __future__ import annotations

# on the study
FINGERPRINT_ATTR = "saeuniv.spec_fingerprint"  # SweepSpec.fingerprint of its creator
SPEC_ATTR = "saeuniv.spec"  # the spec's name
PARENT_ATTR = "saeuniv.mlflow_parent_run_id"  # the MLflow run every worker logs into
ARTEFACTS_ATTR = "saeuniv.artefacts"  # digest of the SAE codes trials are scored on

# on a trial
WORKER_ATTR = "saeuniv.worker"  # procs.worker_id of the process running it
RUN_ATTR = "saeuniv.mlflow_run_id"  # its nested MLflow run
RETRY_ATTR = "saeuniv.retry_of"  # the trial whose parameters it runs again
RETRIES_ATTR = "saeuniv.retries"  # how often those parameters were queued again
FAILURE_ATTR = "saeuniv.failure"  # why a worker that is gone left it FAIL
SKIPPED_ATTR = "saeuniv.skipped"  # why it was PRUNED unrun: others did the count
