"""Ladders of N >= 3 models: every pair (or neighbours plus every model against the
largest) compared as a child main run, and the trend across sizes on the parent run.

``spec`` reads and checks a ladder file; ``trend`` turns finished pairs into middle-band
scores; ``run`` runs the pairs and logs the trend.
"""

from .run import run_ladder
from .spec import PAIRINGS, Ladder, Rung, load_ladder

__all__ = ["PAIRINGS", "Ladder", "Rung", "load_ladder", "run_ladder"]
