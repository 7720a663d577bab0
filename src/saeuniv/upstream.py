"""Everything upstream of matching: the corpus, the tokenizers, the analysis windows and
the two sides (models, SAEs, codes), resolved lazily through the store.

Only the config sections that decide these are read here, so pipelines that differ only in
their analysis settings (``stages.analysis_sections``) share one ``Upstream``: no store
lookup, checksum or model load is repeated (``Pipeline.with_analysis``).
"""

from __future__ import annotations

from functools import cached_property

from .config import Config
from .core.depth import depth_pairs
from .corpus import prepare_corpus
from .models import LoadedModel, train_family
from .sides import Side
from .store import Entry, Store
from .tokens import analysis_windows, train_tokenizer


class Upstream:
    """Corpus, tokenizers, windows and both sides of ``cfg``."""

    def __init__(self, cfg: Config, store: Store, models: dict | None = None):
        self.cfg, self.store = cfg, store
        # model key -> loaded, shared by the sides (and by another pipeline's, when given)
        self.models: dict[str, LoadedModel] = {} if models is None else models
        self.a, self.b = Side(self, "a"), Side(self, "b")
        self.sides = (self.a, self.b)

    def release(self) -> None:
        """Drop the loaded models and SAEs (what is in the store stays): a ladder frees a
        pair's models before the next pair loads its own."""
        self.models.clear()
        for side in self.sides:
            side.saes.clear()

    @cached_property
    def corpus(self) -> Entry:
        return prepare_corpus(self.cfg.corpus, self.store)

    @cached_property
    def family_tokenizer(self) -> Entry:
        return train_tokenizer(self.corpus, self.cfg.tokenizer, self.store)

    @cached_property
    def windows_entry(self) -> Entry:
        """The analysis windows of both sides (raises when the corpus is too small)."""
        e = self.cfg.extract
        sides = [(side.tokenizer_entry, side.bos) for side in self.sides]
        return analysis_windows(self.corpus, sides, e.context, e.n_tokens, self.store)

    @cached_property
    def shared_tokenizer(self) -> bool:
        return self.windows_entry.meta["shared_tokenizer"]

    @cached_property
    def model_entries(self) -> dict[str, Entry]:
        """The family members the two sides use, trained (or read back) by name."""
        names = sorted({side.ref.name for side in self.sides if side.family})
        if not names:
            return {}
        return train_family(self.cfg.family, self.corpus, self.family_tokenizer, self.store,
                            names)

    @cached_property
    def pairs(self) -> list[tuple[int, int]]:
        """The compared (A layer, B layer) pairs: every pair, or each A layer with the B
        layer at the nearest relative depth (``pairs: depth``)."""
        a, b = self.a, self.b
        if self.cfg.pairs == "depth":
            return depth_pairs(a.layers, a.info.n_layers, b.layers, b.info.n_layers)
        return [(la, lb) for la in a.layers for lb in b.layers]

    def nearest_b(self, la: int) -> int:
        """The B layer at the relative depth nearest to A layer ``la``."""
        return depth_pairs([la], self.a.info.n_layers, self.b.layers, self.b.info.n_layers)[0][1]
