"""Helpers shared by the tests: the offline environment, a synthetic corpus, and private
MLflow databases and stores for a block of code."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}

SUBJECTS = ["the whale", "the captain", "a sailor", "the ship", "the sea", "the harbour",
            "the president", "congress", "the nation", "the people", "a merchant", "the crew"]
VERBS = ["sees", "follows", "praises", "fears", "remembers", "builds", "crosses", "defends",
         "finds", "loses", "welcomes", "questions"]
OBJECTS = ["the storm", "the law", "a new treaty", "the white whale", "the budget", "the coast",
           "the old harpoon", "the union", "a long voyage", "the treasury", "the island",
           "the fleet"]
TAILS = ["in the morning", "last week", "in New York", "across the United States",
         "before the winter", "with great care", "at night", "in March", "for many years"]


def synthetic_text(n_docs: int, seed: int = 0) -> list[str]:
    """Templated English documents: a few hundred words each, reproducible by seed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        paras = []
        for _ in range(rng.randint(2, 4)):
            sents = []
            for _ in range(rng.randint(3, 6)):
                s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                if rng.random() < 0.6:
                    s += f" {rng.choice(TAILS)}"
                sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"]))
            paras.append(" ".join(sents))
        docs.append("\n\n".join(paras))
    return docs


def bpe_tokenizer(vocab_size: int, bos: bool, seed: int = 1,
                  specials=("<s>", "</s>", "<pad>")):
    """A byte-level BPE trained on synthetic text (``seed``) as a Hugging Face fast
    tokenizer, ``<s>`` prepended when ``bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_text(60, seed=seed), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@contextlib.contextmanager
def env_vars(**values):
    """Set environment variables for a block and restore them after (for module-scoped
    fixtures, which cannot use monkeypatch)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def private_runs(root, chdir: bool = False):
    """A private MLflow SQLite database and artefact store under ``root`` for a block
    (and ``root`` as the working directory when ``chdir``); yields the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    with env_vars(MLFLOW_TRACKING_URI=uri, SAEUNIV_HOME=str(root / "store")):
        if chdir:
            os.chdir(root)
        try:
            yield uri
        finally:
            os.chdir(cwd)


def runs(uri: str):
    """Every run of the tracking store at ``uri`` (a pandas frame)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def all_metrics(run) -> dict[str, float]:
    """A run's metrics with its per-layer-pair tables as keys (``saeuniv.cells``)."""
    from saeuniv.cells import cell_metrics

    return {**run.data.metrics, **cell_metrics(run.info.run_id)}


def finished(frame, stage: str):
    """The FINISHED runs of ``stage`` in a frame of runs."""
    return frame[(frame["tags.saeuniv.stage"] == stage) & (frame.status == "FINISHED")]


def artifact_dir(run_id: str) -> Path:
    """The local folder of a run's artefacts."""
    from urllib.parse import unquote, urlparse

    import mlflow

    uri = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


# built by tasks: extraction blocks, then layer pairs
TASK_KINDS = ("codes", "matches", "scores", "labels", "subspaces")


def files(root: Path, kind: str) -> dict[str, object]:
    """Every file of a store kind: its bytes, or for .npz each array (the zip wrapper holds a
    timestamp)."""
    import numpy as np

    out = {}
    for path in sorted((root / kind).glob("*/*")):
        if path.name == "manifest.json" or not path.is_file():
            continue
        name = str(path.relative_to(root))
        if path.suffix == ".npz":
            with np.load(path) as z:
                out[name] = {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files}
        else:
            out[name] = path.read_bytes()
    return out


def first_try(marks: Path, task) -> bool:
    """True the first time a task is seen in the folder ``marks`` (a mark left there)."""
    mark = marks / task.label().replace(" ", "-")
    if mark.exists():
        return False
    mark.touch()
    return True
