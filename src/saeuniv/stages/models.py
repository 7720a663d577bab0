"""The ``models`` stage: prepare the corpus and the tokenizer, train (or load) the two models,
and log what they are.

Logged: ``n_layers_<side>`` and ``d_model_<side>``; for the built-in family each member's
validation loss curve (``val_loss_<model>``, step = training step) and parameter counts,
and ``param_ratio`` (B / A) and ``val_loss_gap`` (A - B) when both are members; the tags
``saeuniv.model_<side>`` (source and name), ``saeuniv.model_<side>.key`` and
``saeuniv.tokenizer_<side>`` (SHA-256 of its ``tokenizer.json``).
"""

from __future__ import annotations

import mlflow

from ..tokens import tokenizer_sha


def run(pipe) -> None:
    for name, entry in pipe.up.model_entries.items():
        meta = entry.meta
        for step, value in meta["val_curve"]:
            mlflow.log_metric(f"val_loss_{name}", value, step=step)
        mlflow.log_metrics({f"params_{name}": meta["params"],
                            f"non_embedding_params_{name}": meta["non_embedding_params"]})
        mlflow.set_tag(f"saeuniv.model.{name}", entry.key)
    for side in pipe.sides:
        info, ref = side.info, side.ref
        mlflow.log_metrics({f"n_layers_{side.name}": info.n_layers,
                            f"d_model_{side.name}": info.d_model})
        mlflow.set_tags({f"saeuniv.model_{side.name}": f"{ref.source}:{info.name}",
                         f"saeuniv.model_{side.name}.key": side.model_key,
                         f"saeuniv.tokenizer_{side.name}": tokenizer_sha(side.tokenizer_entry)})
    if all(side.model_entry is not None for side in pipe.sides):
        a, b = pipe.a.model_entry.meta, pipe.b.model_entry.meta
        mlflow.log_metrics({"param_ratio": b["params"] / a["params"],
                            "val_loss_gap": a["val_loss"] - b["val_loss"]})
    mlflow.set_tag("saeuniv.corpus_hash", pipe.up.corpus.meta["source_hash"])
