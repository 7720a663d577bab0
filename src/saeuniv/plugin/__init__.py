"""saeuniv as an MLflow plugin (entry points in ``pyproject.toml``, found by MLflow itself):

- ``context``: a run context provider: every run started in a process that uses saeuniv
  gets its lineage tags (``mlflow.run_context_provider``);
- ``corpus_source``: the token corpus as an MLflow dataset source, and its constructor
  ``mlflow.data.from_saeuniv_corpus`` (``mlflow.dataset_source``,
  ``mlflow.dataset_constructor``).

MLflow loads these while it is itself being imported, so each module imports only the
MLflow pieces it extends and reaches the rest of saeuniv inside its functions. They are
two modules because MLflow loads them from two of its own modules: one module serving
both would be half-imported when the second asks for it.
"""
