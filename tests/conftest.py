"""Shared fixtures: an offline environment, a synthetic corpus and one tiny pipeline run."""

from __future__ import annotations

import contextlib
import os
import random

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)

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


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder of 120 synthetic .txt documents."""
    path = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(synthetic_text(120)):
        (path / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return path


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


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A private MLflow SQLite store and artefact store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAEUNIV_HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
