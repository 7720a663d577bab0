"""The pipeline: the artefacts of one config, resolved lazily through the store.

``Pipeline`` holds what is upstream of matching (``Upstream``: the corpus, the tokenizers,
the windows and the two sides, ``pipe.a`` and ``pipe.b``) and adds what the analysis
settings decide: which code rows are analysed, the compared layer pairs of the subspaces
stage, the concept set and where its phrases occur. Each artefact is fetched from the store
or built once, so any stage can run alone: it computes what it needs that is not already in
the store, and nothing else. The stages (``saeuniv.stages``) read it and log what they made.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from . import stages
from .concepts import load_concepts
from .config import Config, ConfigError
from .core import devices, subspaces
from .corpus import read_split
from .executors import check_slurm
from .extract import load_codes
from .plan import planned_bytes
from .saes import check_ref
from .sides import Memo, Side
from .store import Entry, Store
from .upstream import Upstream

DISK_FIX = "lower extract.n_tokens, compare fewer layers (layers_a, layers_b, pairs: depth)"


class Pipeline:
    """Lazily resolved artefacts of ``cfg`` in ``store`` (default: ``$SAEUNIV_HOME``).

    ``upstream`` shares the upstream artefacts of another pipeline whose config differs
    only in the analysis sections (see :meth:`with_analysis`); ``models`` shares another
    pipeline's loaded models (``pipe.up.models``), so a model both use is loaded once.
    """

    def __init__(self, cfg: Config, store: Store | None = None,
                 upstream: Upstream | None = None, models: dict | None = None):
        self.cfg = cfg
        self.store = store or Store()
        self.up = upstream or Upstream(cfg, self.store, models)
        self.a, self.b = self.up.a, self.up.b
        self.sides = self.up.sides
        self.row_spans = Memo(self._row_spans)  # side name -> (n_rows, 2) character spans
        self.validated: set[str] = set()
        # for the executors (saeuniv.executors): the stages this process will run, those
        # whose units were already built ahead, and the Slurm job arrays that built them
        self.ahead: tuple[str, ...] = ()
        self.prebuilt: set[str] = set()
        self.slurm_jobs: dict[str, list[str]] = {}

    def side(self, name: str) -> Side:
        """Side ``"a"`` or ``"b"``."""
        return {"a": self.a, "b": self.b}[name]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The compared (A layer, B layer) pairs."""
        return self.up.pairs

    def nearest_b(self, la: int) -> int:
        """The B layer at the relative depth nearest to A layer ``la``."""
        return self.up.nearest_b(la)

    @property
    def extract_blocks(self) -> list[tuple]:
        """The extraction units: (side name, layer, ...) for each block of each side's
        layers (``Side.extract_blocks``)."""
        return [(side.name, *block) for side in self.sides for block in side.extract_blocks]

    @property
    def subspace_pairs(self) -> list[tuple[int, int]]:
        """The compared layer pairs the subspaces stage scores (``subspaces.pairs``)."""
        if self.cfg.subspaces.pairs == "depth":
            return [(la, lb) for la, lb in self.pairs if lb == self.nearest_b(la)]
        return self.pairs

    @cached_property
    def device(self):
        """Where matching and the nulls run (``execution.device``): ``None`` for the numpy
        path on this machine's CPU, else a torch device (``saeuniv.core.devices``)."""
        try:
            return devices.analysis_device(self.cfg.execution.device)
        except ValueError as err:
            raise ConfigError(f"{err}; set execution.device: auto or cpu") from None

    @property
    def device_key(self) -> dict:
        """What the device adds to the spec of an entry it computes: nothing for the numpy
        path, else its kind, so results of the two paths (equal to 1e-6, not bit for bit)
        are never taken for each other."""
        return {} if self.device is None else {"device": self.device.type}

    # -- the rows the analysis reads ----------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Code rows the analysis reads: every row, or the first ``match.n_tokens``."""
        rows = int(self.up.windows_entry.meta["n_valid_tokens"])
        n = self.cfg.match.n_tokens
        return min(rows, n) if n else rows

    def analysis_codes(self, entry: Entry):
        """The rows of a codes entry that matching and labelling read: all of them, or the
        first ``match.n_tokens`` (the windows of a smaller token budget)."""
        codes, n = load_codes(entry), self.cfg.match.n_tokens
        if not n:
            return codes
        if n > codes.shape[0]:
            raise ValueError(
                f"match.n_tokens={n} exceeds the {codes.shape[0]} code rows extracted; raise "
                f"extract.n_tokens to at least {n} (or lower match.n_tokens)")
        return codes[:n]

    # -- concepts -----------------------------------------------------------------------
    @cached_property
    def concepts(self) -> subspaces.ConceptSet:
        return load_concepts(self.cfg.subspaces.concepts)

    @cached_property
    def occurrences(self) -> subspaces.Occurrences:
        """Phrase occurrences of every concept category in the analysis documents."""
        used = set(np.unique(self.a.windows.doc).tolist())
        texts = [d["text"] if i in used else "" for i, d in
                 enumerate(read_split(self.up.corpus, "analysis"))]
        return subspaces.occurrences(texts, self.concepts)

    def _row_spans(self, name: str) -> np.ndarray:
        """Character span of the token at every code row of side ``name``, in the analysis
        documents laid end to end (the coordinates of ``occurrences``)."""
        side = self.side(name)
        win, pos = side.windows, side.positions
        spans = win.offsets[pos[:, 0], pos[:, 1]].astype(np.int64)
        return spans + self.occurrences.base[win.doc[pos[:, 0]]][:, None]

    # -- before any work ------------------------------------------------------------------
    def validate(self, stage: str = "run") -> None:
        """Cheap checks that fail before any model is trained or run: Slurm reachable for
        the ``slurm`` executor, layers in range, SAE sources that exist and fit each model,
        the token budget, the concept set, and free disk space for what ``stage`` and the
        stages before it will write (``run``: every stage)."""
        if "run" in self.validated or stage in self.validated:
            return
        if self.cfg.execution.executor == "slurm":
            check_slurm()
        _ = self.device  # raises when execution.device names a GPU this machine lacks
        for side in self.sides:
            check_ref(side.sae_ref, side.info, side.used_layers, side.name)
            s = self.cfg.sae
            if side.trained_saes and s.architecture == "topk" \
                    and s.topk > s.expansion * side.info.d_model:
                raise ConfigError(
                    f"sae.topk={s.topk} exceeds the width of model_{side.name}'s SAEs "
                    f"(sae.expansion x d_model = {s.expansion} x {side.info.d_model}); lower "
                    "sae.topk or raise sae.expansion")
        _ = self.up.windows_entry  # raises when the corpus is smaller than the token budget
        _ = self.concepts  # raises when the concept set is missing or malformed
        self.store.check_space(planned_bytes(self, stage), fix=DISK_FIX)
        self.validated.add(stage)

    def with_analysis(self, cfg: Config) -> Pipeline:
        """A pipeline for ``cfg`` that shares this one's upstream artefacts (corpus to codes).

        ``cfg`` may differ from this pipeline's config only in the analysis sections
        (``stages.analysis_sections()``), so the models, SAEs and codes already resolved
        here are reused as they are: no store lookup, checksum or model load is repeated.
        """
        analysis = stages.analysis_sections()

        def upstream(c: Config) -> dict:
            return {k: v for k, v in c.to_dict().items() if k not in analysis}

        mine, theirs = upstream(self.cfg), upstream(cfg)
        if mine != theirs:
            keys = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"config differs upstream of matching in {keys}; only "
                             f"{list(analysis)} may differ")
        return Pipeline(cfg, self.store, self.up)
