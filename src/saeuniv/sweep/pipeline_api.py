"""What the sweep takes from the pipeline and from tracking: the one module that
imports them.

The stages are moving (``saeuniv.pipeline`` to ``saeuniv.stages`` and friends); when
they do, only the imports below change. The rest of the package imports these names
from here, and inside the functions that use them: ``saeuniv.pipeline`` loads torch
and the model code (seconds), which reading and refusing a sweep spec must not wait
for.

What the sweep calls on a ``Pipeline`` (``pipe``):

* ``Pipeline(cfg, store)``, ``pipe.validate()``, ``pipe.with_analysis(cfg)`` (a
  trial's pipeline, sharing the resolved artefacts) and ``pipe.cfg``;
* ``pipe.pairs()``, ``pipe.layers("a")``, ``pipe.relative_depth(side, layer)`` and
  ``pipe.name(side)`` (the layer pairs, the middle band, the summary);
* ``pipe.matches(la, lb)`` and ``pipe.scores(la, lb)`` (store entries: ``.meta``
  and, through ``load_scores``, the scores) and ``pipe.all_codes`` (side -> layer
  -> codes entry, whose ``manifest["files"][name]["sha256"]`` fingerprint the
  study's artefacts).
"""

from __future__ import annotations

from ..pipeline import STAGES, Pipeline, load_scores, log_scores, pair_key, run_stage
from ..tracking import lineage_tags, record_failure, stage_run

__all__ = ["STAGES", "Pipeline", "lineage_tags", "load_scores", "log_scores",
           "pair_key", "record_failure", "run_stage", "stage_run"]
