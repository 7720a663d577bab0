"""Lineage tags: what makes a pipeline's runs reproducible, as MLflow tags.

Code and environment (``tracking.lineage_tags``: saeuniv version, git commit and dirty
flag, library versions), the config hash, the seeds, and what is already resolved of the
inputs: the corpus hash (``saeuniv.corpus_hash``), the analysis token count
(``saeuniv.n_tokens``), each side's model key (``saeuniv.model_a.key``) and SAE keys
(``saeuniv.sae.a0``: side and layer). Nothing is computed to tag it: a key that is not
resolved yet is left out, and the stages set these tags again when they end, so every key
a stage resolved is on its run, with the same value on every run of the pipeline.

The corpus is also an MLflow dataset input of each run that resolved it (``log_corpus``):
the runs table's Dataset column, filter and compare view say which runs read the same text.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from .plugin.corpus_source import SPLIT, corpus_dataset
from .tracking import lineage_tags

SEEDS = ("corpus", "family", "sae", "similarity", "subspaces")  # config sections with a seed


def pipeline_lineage(pipe) -> dict[str, str]:
    """The lineage tags of ``pipe`` (a ``Pipeline``), from what it has resolved so far."""
    cfg = pipe.cfg
    tags = lineage_tags(cfg.hash())
    tags["saeuniv.config_name"] = cfg.name
    tags.update({f"saeuniv.seed.{s}": str(getattr(cfg, s).seed) for s in SEEDS})
    resolved = vars(pipe.up)
    if "corpus" in resolved:
        tags["saeuniv.corpus_hash"] = pipe.up.corpus.meta["source_hash"]
    if "windows_entry" in resolved:
        tags["saeuniv.n_tokens"] = str(pipe.up.windows_entry.meta["n_valid_tokens"])
    for side in pipe.sides:
        key = side.resolved_model_key()
        if key is not None:
            tags[f"saeuniv.model_{side.name}.key"] = key
        for layer, sae in sorted(side.resolved_sae_keys().items()):
            tags[f"saeuniv.sae.{side.name}{layer}"] = sae
    return tags


def log_corpus(pipe, resolve: bool = False) -> None:
    """Log the corpus's analysis split as the active run's dataset input, with the
    compared token count once the windows are cut. Unless ``resolve``, nothing when the
    corpus is not resolved in this process (a reused stage run)."""
    resolved = vars(pipe.up)
    if "corpus" not in resolved and not resolve:
        return
    n_tokens = (pipe.up.windows_entry.meta["n_valid_tokens"]
                if "windows_entry" in resolved else None)
    dataset = corpus_dataset(pipe.cfg.corpus, pipe.up.corpus, n_tokens)
    try:
        mlflow.log_input(dataset, context=SPLIT)
    except MlflowException:
        # two runs logging one new dataset at once: MLflow's check-then-insert lets both
        # insert it, and the second fails on the unique key; its retry finds the first's row
        mlflow.log_input(dataset, context=SPLIT)
