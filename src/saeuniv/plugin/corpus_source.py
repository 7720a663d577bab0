"""The token corpus as an MLflow dataset: a source that resolves back to a saeuniv corpus.

A run's input records which text it read: the corpus as configured (``corpus.source``),
where that text comes from (an npm package and version, a Hugging Face dataset and split,
a local file), its content hash, and the split settings, so that
``mlflow.data.get_source(run.inputs.dataset_inputs[0]).load()`` rebuilds the same
analysis split (checked against the hash) in the saeuniv store. The dataset's digest is
the store key of that split: two runs with one digest read the same documents. Its
profile holds the split's document and character counts and, once the analysis windows
are cut, the number of compared tokens.
"""

# No ``from __future__ import annotations``: MLflow checks the constructor's return
# annotation with issubclass, which needs the class, not its name.
import json
from dataclasses import asdict, dataclass
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

SPLIT = "analysis"  # the split every compared token comes from


@dataclass
class CorpusSource(DatasetSource):
    """A saeuniv corpus: ``source`` as configured, its ``origin`` and ``location``
    (``corpus.describe_source``), the ``source_hash`` of its documents and the settings
    that cut it into train and analysis splits."""

    source: str
    origin: str
    location: str
    source_hash: str
    analysis_fraction: float
    max_doc_chars: int
    seed: int

    @staticmethod
    def _get_source_type() -> str:
        return "saeuniv_corpus"

    def load(self, store_root: str | None = None) -> str:
        """Prepare the corpus in the saeuniv store (``store_root``, default
        ``$SAEUNIV_HOME``) and return the folder of its splits; raises when the text
        found now is not the text the run read."""
        from ..corpus import prepare_corpus
        from ..store import Store

        entry = prepare_corpus(self.config(), Store(store_root))
        if entry.meta["source_hash"] != self.source_hash:
            raise ValueError(f"corpus {self.source!r} now hashes to "
                             f"{entry.meta['source_hash'][:12]}, not {self.source_hash[:12]} "
                             "as when it was logged: the text changed")
        return str(entry.path)

    def config(self):
        """The ``CorpusConfig`` that makes this corpus."""
        from ..config import CorpusConfig

        return CorpusConfig(source=self.source, analysis_fraction=self.analysis_fraction,
                            max_doc_chars=self.max_doc_chars, seed=self.seed)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        # by name: the registry asks every source about every raw source, and importing
        # saeuniv's config here would cost numpy and the core for someone else's dataset
        return type(raw_source).__name__ == "CorpusConfig" and \
            type(raw_source).__module__.startswith("saeuniv.")

    @classmethod
    def _resolve(cls, raw_source: Any) -> "CorpusSource":
        from ..corpus import prepare_corpus
        from ..store import Store

        return cls.from_corpus(raw_source, prepare_corpus(raw_source, Store()).meta)

    @classmethod
    def from_corpus(cls, cfg, meta: dict) -> "CorpusSource":
        """The source of a corpus config ``cfg`` whose prepared entry has ``meta``."""
        from ..corpus import describe_source

        return cls(source=cfg.source, **describe_source(cfg.source),
                   source_hash=meta["source_hash"], analysis_fraction=cfg.analysis_fraction,
                   max_doc_chars=cfg.max_doc_chars, seed=cfg.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "CorpusSource":
        return cls(**source_dict)


class CorpusDataset(MetaDataset):
    """A corpus split as an MLflow dataset: no rows, its source, digest and profile."""

    def __init__(self, source: CorpusSource, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def from_saeuniv_corpus(corpus, *, store_root: str | None = None, n_tokens: int | None = None,
                        name: str | None = None, digest: str | None = None) -> CorpusDataset:
    """The analysis split of a saeuniv corpus as an MLflow dataset
    (``mlflow.data.from_saeuniv_corpus``).

    Parameters
    ----------
    corpus : CorpusConfig
        The corpus settings (``Config.corpus``); prepared in the store if needed.
    store_root : str, optional
        The saeuniv store (default ``$SAEUNIV_HOME``).
    n_tokens : int, optional
        The compared tokens read from the split, for the profile.
    name, digest : str, optional
        Default: the source and split (``stdlib-sotu (analysis)``); the store key of the
        prepared split.
    """
    from ..corpus import prepare_corpus
    from ..store import Store

    entry = prepare_corpus(corpus, Store(store_root))
    return corpus_dataset(corpus, entry, n_tokens, name, digest)


def corpus_dataset(cfg, entry, n_tokens: int | None = None, name: str | None = None,
                   digest: str | None = None) -> CorpusDataset:
    """The dataset of corpus config ``cfg`` whose prepared store entry is ``entry``."""
    meta = entry.meta
    profile = {"split": SPLIT, "documents": meta[f"{SPLIT}_documents"],
               "characters": meta[f"{SPLIT}_chars"]}
    if n_tokens is not None:
        profile["tokens"] = int(n_tokens)
    source = CorpusSource.from_corpus(cfg, meta)
    # a local file by its name: the full path is in the source
    label = source.location.rsplit("/", 1)[-1] if source.origin == "file" else cfg.source
    return CorpusDataset(source, name or f"{label} ({SPLIT})", digest or entry.key[:12],
                         profile)
