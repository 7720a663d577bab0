"""saeuniv: do language models of different sizes learn the same SAE features?

The package is split into a pure core (``metrics``, ``matching``, ``alignment``:
arrays in, arrays out, no I/O) and a shell (corpus, models, SAEs, storage,
tracking, CLI) that feeds the core and records its results in MLflow.
"""

__version__ = "0.1.0"
