"""The stages of the pipeline, each listed once.

A stage reads its inputs through the pipeline (``saeuniv.pipeline.Pipeline``), builds what
is missing through the content-keyed store, and logs what it produced into the active
MLflow run. Its code is ``saeuniv.stages.<name>`` (a ``run(pipe)`` function); this registry
says what each stage depends on and writes. The command line (a subcommand per stage), the
MLproject entry points (``saeuniv.project``), run reuse (``saeuniv.stages.runner``), the
disk plan and the sweep's base stages are all derived from ``STAGES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage.

    Attributes
    ----------
    name : str
        Subcommand, MLproject entry point and ``saeuniv.stage`` tag.
    help : str
        One line for ``saeuniv --help``.
    after : str or None
        The stage whose inputs this stage's inputs include.
    sections : tuple of str
        The config sections this stage adds to those inputs.
    kinds : tuple of str
        The store kinds it builds (recomputed under ``--force``).
    units : str
        For a stage whose work splits into independent units: the pipeline attribute that
        lists them (``extract_blocks``: (side, layer, ...) blocks of one model's layers;
        ``pairs``, ``subspace_pairs``: (A layer, B layer)); its module's ``cell(pipe,
        *unit)`` builds one (``saeuniv.tasks``). Empty for a stage that works as a whole.
    """

    name: str
    help: str
    after: str | None
    sections: tuple[str, ...]
    kinds: tuple[str, ...]
    units: str = ""

    @property
    def module(self):
        """``saeuniv.stages.<name>``: the stage's code (imported on first use)."""
        return importlib.import_module(f"{__name__}.{self.name}")

    def run(self, pipe) -> None:
        """Run the stage on ``pipe``, logging into the active MLflow run."""
        self.module.run(pipe)


STAGES: tuple[Stage, ...] = (
    Stage("models", "prepare the corpus and tokenizer, train (or load) the two models",
          None, ("corpus", "tokenizer", "family", "model_a", "model_b"),
          ("corpus", "tokenizer", "model")),
    Stage("saes", "train (or load) one SAE per (model, layer) with sae-lens",
          "models", ("layers_a", "layers_b", "pairs", "sae_a", "sae_b", "sae", "extract"),
          ("sae", "preflight")),
    Stage("extract", "residual stream -> SAE codes, stored sparse per (model, layer)",
          "saes", (), ("windows", "codes"), "extract_blocks"),
    Stage("match", "correlate features of A and B and pair them (policy, threshold, filters)",
          "extract", ("match", "tracking"),
          ("matches", "residuals", "matchers", "unembed", "vocab_gram"), "pairs"),
    Stage("similarity", "SVCCA, RSA, CKA, mutual-kNN on paired decoder rows, with "
          "permutation nulls, raw and calibrated", "match", ("similarity",), ("scores",),
          "pairs"),
    Stage("convergence", "grid tests of the calibrated scores (best cell, middle band, "
          "depth diagonal), twin-SAE ceilings, a random-init floor, the convergence index",
          "similarity", (), ()),
    Stage("subspaces", "label features by concept (configs/concepts/), score each category "
          "per layer pair against shuffled-pairing and random-subspace nulls", "match",
          ("subspaces",), ("labels", "subspaces"), "subspace_pairs"),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
BASE = ("models", "saes", "extract")  # the stages that run a model: a sweep runs them once
TRIAL = ("match", "similarity")  # what a sweep trial runs, at its own settings


def get(name: str) -> Stage:
    """The stage called ``name``."""
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(NAMES)}")
    return BY_NAME[name]


def sections(name: str) -> tuple[str, ...]:
    """Every config section the stage's result depends on: its own and its inputs'."""
    stage = get(name)
    return (sections(stage.after) if stage.after else ()) + stage.sections


def upto(name: str) -> tuple[Stage, ...]:
    """The stages that run before ``name``, and ``name`` itself (``run``: all of them)."""
    if name == "run":
        return STAGES
    return STAGES[:NAMES.index(get(name).name) + 1]


def analysis_sections() -> tuple[str, ...]:
    """Config sections that decide nothing a model computes: a pipeline that differs only
    in these shares every model, SAE and code entry."""
    return tuple(s for stage in STAGES if stage.name not in BASE for s in stage.sections)


def sweep_sections() -> tuple[str, ...]:
    """The config sections a sweep trial varies: those of the stages a trial runs (the
    pairing and the scores; the concept subspaces are not part of a trial)."""
    return tuple(s for name in TRIAL for s in get(name).sections)
