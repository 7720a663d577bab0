"""Objectives: a trial's values, read from the similarity scores stored for it.

A trial matches and scores every layer pair through the store (``score_trial``); each
objective is then the mean of one score over the layer pairs it selects (``all``, or
``middle``: the A layers at relative depth 1/3 to 2/3, ``saeuniv.core.depth.MIDDLE``).
A layer pair with no score is skipped; an objective with no score at all fails the
trial (``TrialError``) rather than hand Optuna a NaN.
"""

from __future__ import annotations

import math

from ..core.depth import in_middle
from .spec import Objective, SpecError


class TrialError(ValueError):
    """A trial cannot give a value (e.g. no selected layer pair was scored)."""


def selected_pairs(pipe, objective: Objective) -> list[tuple[int, int]]:
    """The layer pairs an objective averages over: all, or those whose A layer's
    relative depth is in the middle band (``saeuniv.core.depth.in_middle``)."""
    pairs = pipe.pairs
    if objective.layers == "all":
        return pairs
    return [(la, lb) for la, lb in pairs if in_middle(pipe.a.depth(la))]


def check_objectives(pipe, objectives) -> None:
    """Every objective selects at least one layer pair of ``pipe``: a ``middle``
    objective on A layers that all lie outside the band is refused before the study
    opens."""
    for o in objectives:
        if not selected_pairs(pipe, o):
            depths = {la: round(pipe.a.depth(la), 3) for la in pipe.a.layers}
            raise SpecError(f"objective {o.name!r}: no layer pair has an A layer at "
                            f"relative depth in [1/3, 2/3] (A layers and depths: "
                            f"{depths}); use layers: all")


def score_trial(pipe) -> dict[tuple[int, int], dict]:
    """Match and score every layer pair of ``pipe`` through the store (a setting seen
    before is read back, not recomputed): pair -> {"match": counts, "scores": scores}.
    """
    from ..stages import match, similarity

    return {(la, lb): {"match": match.entry(pipe, la, lb).meta,
                       "scores": similarity.load(similarity.entry(pipe, la, lb))}
            for la, lb in pipe.pairs}


def objective_value(objective: Objective, pipe, scored: dict) -> float:
    """Mean of the objective's score over its layer pairs, skipping pairs with no
    score; raises TrialError when none has one."""
    values, why = [], []
    for pair in selected_pairs(pipe, objective):
        s = scored[pair]["scores"]
        if objective.metric == "n_pairs":
            values.append(float(s["n_pairs"]))
            continue
        r = s["metrics"].get(objective.metric, {})
        v = r.get(objective.field)
        if v is not None and math.isfinite(v):
            values.append(float(v))
        else:
            why.append(r.get("error") or (s["status"] if s["status"] != "ok"
                                          else f"{objective.field} undefined"))
    if not values:
        raise TrialError(
            f"objective {objective.name!r}: no {objective.layers} layer pair has a "
            f"{objective.metric} {objective.field} score at these settings ("
            f"{why[0] if why else 'no layer pair selected'}); the trial fails rather "
            "than return NaN")
    return float(sum(values) / len(values))
