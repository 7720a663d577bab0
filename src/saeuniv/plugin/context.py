"""The lineage of every run started where saeuniv is in use, as an MLflow run context.

MLflow asks each registered provider, at every ``mlflow.start_run``, whether it applies
(``in_context``) and for its tags. saeuniv applies once any of its modules other than
this plugin is imported: a ``saeuniv`` command, or a notebook that calls saeuniv's
functions around its own ``mlflow.start_run()``. Its tags: the saeuniv version and code
hash, the git commit and dirty flag of its source tree, the Slurm job and array ids, and
the GPU's name when torch has one.
"""

from __future__ import annotations

import os
import sys

from mlflow.tracking.context.abstract_context import RunContextProvider

# Slurm's variables -> tag names
SLURM = {"SLURM_JOB_ID": "saeuniv.slurm_job_id",
         "SLURM_ARRAY_JOB_ID": "saeuniv.slurm_array_job_id",
         "SLURM_ARRAY_TASK_ID": "saeuniv.slurm_array_task_id"}
_PLUGIN = ("saeuniv", "saeuniv.plugin", "saeuniv.plugin.context",
           "saeuniv.plugin.corpus_source")


def in_use() -> bool:
    """Whether this process uses saeuniv (a module beyond the plugin is imported)."""
    return any(name.startswith("saeuniv.") and name not in _PLUGIN for name in sys.modules)


def context_tags() -> dict[str, str]:
    """The saeuniv version and code hash, git commit and dirty flag, Slurm ids, GPU."""
    from .. import __version__
    from ..tracking import code_version, git_info

    tags = {"saeuniv.version": __version__, "saeuniv.code_version": code_version(),
            **git_info()}
    tags.update({tag: os.environ[var] for var, tag in SLURM.items() if os.environ.get(var)})
    gpu = gpu_name()
    if gpu:
        tags["saeuniv.gpu"] = gpu
    return tags


def gpu_name() -> str | None:
    """The first CUDA device's name, when torch is already loaded and sees one (never
    imported here: a run context must not cost a torch import)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


class SaeunivRunContext(RunContextProvider):
    """Lineage tags on every run started where saeuniv is in use."""

    def in_context(self) -> bool:
        return in_use()

    def tags(self) -> dict[str, str]:
        return context_tags()
