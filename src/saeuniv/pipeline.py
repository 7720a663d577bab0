"""The pipeline: stages over content-keyed artefacts, tracked in MLflow.

``Pipeline`` resolves a config into a chain of store entries (corpus, tokenizer,
windows, models, SAEs, codes, matches, scores). Each accessor fetches its entry
or builds it once, so any stage can run alone: it computes what it needs that
is not already in the store, and nothing else. The stage functions log what
their stage produced into the active MLflow run; ``run_main`` runs them as
nested children of one parent run and writes the report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import torch
from tqdm.auto import tqdm

from . import matching, metrics, subspaces
from .config import Config, ConfigError, ModelRef, SAERef, digest, load_concepts
from .corpus import prepare_corpus, read_split
from .extract import codes_spec, extract_codes, load_codes
from .models import (NONFINITE_FIX, LoadedModel, ModelError, ModelInfo, check_finite, describe,
                     load_family_model, load_outside_model, member_spec, model_identity,
                     outside_tokenizer, resolve_device, train_family)
from .saes import (Quality, check_compatible, check_ref, load_pretrained, load_sae, quality,
                   sae_key, sae_spec, train_saes)
from .store import Entry, Store
from .tokens import (analysis_windows, load_tokenizer, load_windows, make_windows,
                     tokenizer_sha, train_tokenizer)
from .tracking import CHECKSUMS, code_version, lineage_tags, stage_run

log = logging.getLogger(__name__)

STAGES = ("models", "saes", "extract", "match", "similarity", "subspaces")
# Config sections that decide nothing upstream of matching: a pipeline that differs only
# in these shares every model, SAE and code entry (see Pipeline.with_analysis).
ANALYSIS_SECTIONS = ("match", "similarity", "subspaces")
SIDES = ("a", "b")
JUNK_STRINGS = {"", ".", ",", "!", "?", "-", ";", ":", '"', "'", "(", ")"}


class Pipeline:
    """Lazily resolved artefacts of one config."""

    def __init__(self, cfg: Config, store: Store | None = None):
        self.cfg = cfg
        self.store = store or Store()
        self._models: dict[str, LoadedModel] = {}
        self._saes: dict[tuple[str, int], object] = {}
        self._cache: dict = {}

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def ref(self, side: str) -> ModelRef:
        return getattr(self.cfg, f"model_{side}")

    def sae_ref(self, side: str) -> SAERef:
        return getattr(self.cfg, f"sae_{side}")

    # -- text ---------------------------------------------------------------
    @cached_property
    def corpus(self) -> Entry:
        return prepare_corpus(self.cfg.corpus, self.store)

    @cached_property
    def family_tokenizer(self) -> Entry:
        return train_tokenizer(self.corpus, self.cfg.tokenizer, self.store)

    def tokenizer_entry(self, side: str) -> Entry:
        """The side's tokenizer, saved in the store (shared by the built-in family)."""
        ref = self.ref(side)
        if ref.source == "family":
            return self.family_tokenizer
        return self._memo(("tok", side), lambda: outside_tokenizer(
            ref, self.store, self.identity(side)))

    def bos(self, side: str) -> bool:
        """Whether the side's model reads a BOS token first."""
        return True if self.ref(side).source == "family" else bool(
            self.tokenizer_entry(side).meta["bos"])

    def tokenizer(self, side: str):
        entry = self.tokenizer_entry(side)
        return self._memo(("tokobj", entry.key), lambda: load_tokenizer(entry))

    @cached_property
    def shared_tokenizer(self) -> bool:
        return self.windows_entry.meta["shared_tokenizer"]

    @cached_property
    def windows_entry(self) -> Entry:
        e = self.cfg.extract
        sides = [(self.tokenizer_entry(s), self.bos(s)) for s in SIDES]
        return analysis_windows(self.corpus, sides, e.context, e.n_tokens, self.store)

    def windows(self, side: str):
        return self._memo(("win", side), lambda: load_windows(self.windows_entry, side))

    def token_ids(self, side: str) -> np.ndarray:
        """Token id of every code row of ``side`` (compared positions, in order)."""
        return self._memo(("ids", side), lambda: self.windows(side).tokens[
            self.windows(side).mask].astype(np.int64))

    def positions(self, side: str) -> np.ndarray:
        """(window, position) of every code row of ``side``."""
        return self._memo(("pos", side), lambda: np.argwhere(self.windows(side).mask))

    def row_text(self, side: str) -> np.ndarray:
        """Decoded text of the token at every code row of ``side`` (object array)."""
        return self._memo(("rowtext", side), lambda: self.token_text(side, self.token_ids(side)))

    def context(self, row: int, side: str = "a", before: int = 6, after: int = 2) -> str:
        """Text around code row ``row`` as ``side`` tokenized it, the token in [[brackets]]."""
        return self._memo(("ctx", side, int(row), before, after),
                          lambda: self._context(int(row), side, before, after))

    def _context(self, row: int, side: str, before: int, after: int) -> str:
        win = self.windows(side)
        w, pos = self.positions(side)[row]
        toks = win.tokens[w]
        text = win.offsets[w, :, 1] > win.offsets[w, :, 0]
        tok = self.tokenizer(side)
        decode = lambda lo, hi: tok.decode([int(t) for t in toks[lo:hi][text[lo:hi]]])
        return (decode(max(0, pos - before), pos) + "[[" + decode(pos, pos + 1) + "]]"
                + decode(pos + 1, pos + 1 + after))

    def train_windows(self, side: str, n_tokens: int):
        """Packed training-split windows for the side's SAEs (BOS as the model reads it)."""
        ref = self.ref(side)
        context = self.cfg.family.context if ref.source == "family" else self.cfg.extract.context
        docs = [d["text"] for d in read_split(self.corpus, "train")]
        return make_windows(docs, self.tokenizer(side), context, n_tokens, pack=True,
                            bos=self.bos(side))

    # -- models -------------------------------------------------------------
    def member(self, side: str):
        ref = self.ref(side)
        if ref.source != "family":
            raise ModelError(f"model_{side} is not a member of the built-in family")
        return next(m for m in self.cfg.family.members if m.name == ref.name)

    def info(self, side: str) -> ModelInfo:
        """Name, layers and width of the side's model, without loading its weights."""
        ref = self.ref(side)
        if ref.source == "family":
            m = self.member(side)
            return ModelInfo(m.name, m.n_layers, m.d_model)

        def make():  # reading a GGUF header takes seconds: keep the answer in the store
            entry, _ = self.store.get_or_create(
                "info", {"model": self.identity(side), "name": ref.name},
                lambda out: asdict(describe(ref, self.store)))
            return ModelInfo(**entry.meta)
        return self._memo(("info", side), make)

    def name(self, side: str) -> str:
        return self.info(side).name

    def layers(self, side: str) -> list[int]:
        info = self.info(side)
        value = getattr(self.cfg, f"layers_{side}")
        if value == "all":
            layers = list(range(info.n_layers))
        elif isinstance(value, str):  # stride:N
            layers = list(range(0, info.n_layers, int(value.split(":")[1])))
        else:
            layers = list(value)
        bad = [l for l in layers if not 0 <= l < info.n_layers]
        if bad:
            raise ModelError(
                f"layers_{side}: layer(s) {bad} are out of range for {info.name!r}, which has "
                f"{info.n_layers} layers (valid: 0..{info.n_layers - 1})")
        return layers

    def used_layers(self, side: str) -> list[int]:
        """The side's layers that enter a compared pair (all of them unless ``pairs: depth``)."""
        return sorted({pair["ab".index(side)] for pair in self.pairs()})

    @cached_property
    def model_entries(self) -> dict[str, Entry]:
        names = sorted({self.ref(s).name for s in SIDES if self.ref(s).source == "family"})
        if not names:
            return {}
        return train_family(self.cfg.family, self.corpus, self.family_tokenizer, self.store,
                            names)

    def model_entry(self, side: str) -> Entry | None:
        """The trained family member's store entry (None for an outside model)."""
        ref = self.ref(side)
        return self.model_entries[ref.name] if ref.source == "family" else None

    def identity(self, side: str) -> dict:
        return self._memo(("id", side), lambda: model_identity(self.ref(side), self.store))

    def model_key(self, side: str) -> str:
        """Identity of the side's weights and dtype (the family entry key, or a content hash)."""
        entry = self.model_entry(side)
        return entry.key if entry is not None else digest(self.identity(side))

    def model(self, side: str) -> LoadedModel:
        key = self.model_key(side)
        if key not in self._models:
            entry = self.model_entry(side)
            self._models[key] = (load_family_model(entry) if entry is not None
                                 else load_outside_model(self.ref(side), self.store, key))
        return self._models[key]

    # -- SAEs and codes -----------------------------------------------------
    def sae_windows_key(self, side: str) -> str:
        """Identity of the packed training windows the side's SAEs are trained on."""
        return digest([self.corpus.key, tokenizer_sha(self.tokenizer_entry(side)),
                       self.bos(side), "train-packed"])

    def sae_entries(self, side: str) -> dict[int, Entry]:
        """SAEs trained here for every layer of ``side`` (one activation pass for all)."""
        def make():
            s = self.cfg.sae
            return train_saes(self.model_key(side), lambda: self.model(side),
                              self.used_layers(side),
                              s, lambda: self.train_windows(side, s.train_tokens + 64 * 128),
                              self.sae_windows_key(side), self.store,
                              label=f"{side}:{self.name(side)}")
        return self._memo(("saes", side), make)

    def sae_key(self, side: str, layer: int) -> str:
        ref = self.sae_ref(side)
        if ref.source == "train":
            return self.sae_entries(side)[layer].key
        return self._memo(("saekey", side, layer), lambda: sae_key(ref, layer, self.store))

    def sae(self, side: str, layer: int) -> tuple[str, object]:
        """(key, loaded SAE) for ``side`` at ``layer``; trained or fetched on first use."""
        if (side, layer) not in self._saes:
            ref = self.sae_ref(side)
            device = resolve_device(self.ref(side).device) if ref.source != "train" else "cpu"
            sae = (load_sae(self.sae_entries(side)[layer]) if ref.source == "train"
                   else load_pretrained(ref, layer, device))
            check_compatible(sae, self.info(side), layer, f"sae_{side}")
            self._saes[(side, layer)] = sae
        return self.sae_key(side, layer), self._saes[(side, layer)]

    def codes(self, side: str) -> dict[int, Entry]:
        e = self.cfg.extract
        return extract_codes(
            lambda: self.model(side), self.model_key(side),
            {l: self.sae_key(side, l) for l in self.used_layers(side)},
            lambda l: self.sae(side, l)[1], self.windows(side), self.windows_entry, side,
            self.store, e.batch_size, e.shard_windows, e.layers_per_pass,
            label=f"{side}:{self.name(side)}")

    @cached_property
    def all_codes(self) -> dict[str, dict[int, Entry]]:
        return {side: self.codes(side) for side in SIDES}

    def junk_ids(self, side: str) -> np.ndarray:
        def make():
            tok = self.tokenizer(side)
            specials = set(tok.all_special_ids)
            ids = [i for i in range(len(tok))
                   if i in specials or tok.decode([i]).strip() in JUNK_STRINGS]
            return np.asarray(ids, np.int64)
        return self._memo(("junk", side), make)

    def token_text(self, side: str, ids: np.ndarray) -> np.ndarray:
        """Decoded text of each token id (object array), for cross-tokenizer comparisons."""
        tok = self.tokenizer(side)
        uniq, inv = np.unique(ids, return_inverse=True)
        text = np.asarray([tok.decode([int(t)]) if t >= 0 else "" for t in uniq], dtype=object)
        return text[inv].reshape(np.shape(ids))

    # -- matching and similarity -------------------------------------------
    def pairs(self) -> list[tuple[int, int]]:
        la_list, lb_list = self.layers("a"), self.layers("b")
        if self.cfg.pairs == "depth":
            return [(la, self.nearest_b(la)) for la in la_list]
        return [(la, lb) for la in la_list for lb in lb_list]

    def nearest_b(self, la: int) -> int:
        """The B layer at the relative depth nearest to A layer ``la``."""
        depth = self.relative_depth("a", la)
        lb_list = self.layers("b")
        return lb_list[int(np.argmin([abs(self.relative_depth("b", lb) - depth)
                                      for lb in lb_list]))]

    def matches(self, la: int, lb: int) -> Entry:
        ca, cb = self.all_codes["a"][la], self.all_codes["b"][lb]
        match = asdict(self.cfg.match)
        if not match["n_tokens"]:  # every row: the key of entries made before n_tokens existed
            del match["n_tokens"]
        spec = {"codes_a": ca.key, "codes_b": cb.key, "match": match}

        def build(out: Path) -> dict:
            return _build_matches(self, ca, cb, out)

        entry, _ = self.store.get_or_create("matches", spec, build)
        return entry

    def scores(self, la: int, lb: int) -> Entry:
        m = self.matches(la, lb)
        spec = {"matches": m.key, "sae_a": self.sae_key("a", la), "sae_b": self.sae_key("b", lb),
                "similarity": asdict(self.cfg.similarity)}

        def build(out: Path) -> dict:
            return _build_scores(self, la, lb, m, out)

        entry, _ = self.store.get_or_create("scores", spec, build)
        return entry

    # -- semantic subspaces ---------------------------------------------------
    @cached_property
    def concepts(self) -> subspaces.ConceptSet:
        return load_concepts(self.cfg.subspaces.concepts)

    def subspace_pairs(self) -> list[tuple[int, int]]:
        """The compared layer pairs the subspaces stage scores (``subspaces.pairs``)."""
        if self.cfg.subspaces.pairs == "depth":
            return [(la, lb) for la, lb in self.pairs() if lb == self.nearest_b(la)]
        return self.pairs()

    def n_rows(self) -> int:
        """Code rows the analysis reads: every row, or the first ``match.n_tokens``."""
        rows = int(self.windows_entry.meta["n_valid_tokens"])
        return min(rows, self.cfg.match.n_tokens) if self.cfg.match.n_tokens else rows

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

    @cached_property
    def occurrences(self) -> subspaces.Occurrences:
        """Phrase occurrences of every concept category in the analysis documents."""
        used = set(np.unique(self.windows("a").doc).tolist())
        texts = [d["text"] if i in used else "" for i, d in
                 enumerate(read_split(self.corpus, "analysis"))]
        return subspaces.occurrences(texts, self.concepts)

    def row_spans(self, side: str) -> np.ndarray:
        """Character span of the token at every code row of ``side``, in the analysis
        documents laid end to end (the coordinates of ``occurrences``)."""
        def make():
            win, pos = self.windows(side), self.positions(side)
            spans = win.offsets[pos[:, 0], pos[:, 1]].astype(np.int64)
            return spans + self.occurrences.base[win.doc[pos[:, 0]]][:, None]
        return self._memo(("spans", side), make)

    def labels(self, side: str, layer: int) -> Entry:
        """Concept labels of the side's SAE features at ``layer`` (top-k activations)."""
        sub, codes = self.cfg.subspaces, self.all_codes[side][layer]
        spec = {"codes": codes.key, "side": side, "concepts": digest(asdict(self.concepts)),
                "top_k": sub.top_k, "min_hits": sub.min_hits, "rows": self.n_rows()}

        def build(out: Path) -> dict:
            top = matching.top_activations(self.analysis_codes(codes), sub.top_k)
            lab = subspaces.label_features(top.rows, self.row_spans(side), self.occurrences,
                                           sub.min_hits)
            np.savez(out / "labels.npz", hits=lab.hits, phrase=lab.phrase, rows=top.rows,
                     values=top.values)
            return {"n_features": int(lab.hits.shape[0]), "categories": list(
                self.concepts.categories), "n_labelled": lab.member.sum(0).tolist()}

        entry, _ = self.store.get_or_create("labels", spec, build)
        return entry

    def subspace_scores(self, la: int, lb: int) -> Entry:
        """Per-category pairs and scores (both nulls) at one layer pair."""
        sub, mc = self.cfg.subspaces, self.cfg.match
        lab_a, lab_b, m = self.labels("a", la), self.labels("b", lb), self.matches(la, lb)
        spec = {"labels_a": lab_a.key, "labels_b": lab_b.key, "matches": m.key,
                "sae_a": self.sae_key("a", la), "sae_b": self.sae_key("b", lb),
                "policy": mc.policy, "threshold": mc.threshold,
                "subspaces": {k: v for k, v in asdict(sub).items()
                              if k not in ("concepts", "pairs", "context")}}

        def build(out: Path) -> dict:
            return _build_subspaces(self, la, lb, lab_a, lab_b, m, out)

        entry, _ = self.store.get_or_create("subspaces", spec, build)
        return entry

    def validate(self, stage: str = "run") -> None:
        """Cheap checks that fail before any model is trained or run: layers in range,
        SAE sources that exist and fit each model, the token budget, and free disk space
        for what ``stage`` and the stages before it will write (``run``: every stage)."""
        if ("validated", "run") in self._cache or ("validated", stage) in self._cache:
            return
        for side in SIDES:
            check_ref(self.sae_ref(side), self.info(side), self.used_layers(side), side)
            s, info = self.cfg.sae, self.info(side)
            if self.sae_ref(side).source == "train" and s.architecture == "topk" \
                    and s.topk > s.expansion * info.d_model:
                raise ConfigError(
                    f"sae.topk={s.topk} exceeds the width of model_{side}'s SAEs (sae.expansion "
                    f"x d_model = {s.expansion} x {info.d_model}); lower sae.topk or raise "
                    "sae.expansion")
        _ = self.windows_entry  # raises when the corpus is smaller than the token budget
        _ = self.concepts  # raises when the concept set is missing or malformed
        self.store.check_space(self.planned_bytes(stage), fix=(
            "lower extract.n_tokens, compare fewer layers (layers_a, layers_b, pairs: depth)"))
        self._cache[("validated", stage)] = True

    # -- the disk plan: what the store will hold, estimated from the config ------------
    def _planned_model_key(self, side: str) -> str:
        """``model_key`` without training the family member (its store key)."""
        if self.ref(side).source != "family":
            return self.model_key(side)
        return self.store.key("model", member_spec(self.member(side), self.cfg.family,
                                                   self.family_tokenizer))

    def _planned_sae_key(self, side: str, layer: int) -> str:
        """``sae_key`` without training the SAE (its store key)."""
        if self.sae_ref(side).source != "train":
            return self.sae_key(side, layer)
        return self.store.key("sae", sae_spec(self._planned_model_key(side), layer,
                                              self.cfg.sae, self.sae_windows_key(side)))

    def _sae_shape(self, side: str, layer: int) -> tuple[int | None, int]:
        """(width, active features per token) of the side's SAE at ``layer``, as far as known
        without loading it (a release's width is not)."""
        ref, d_model = self.sae_ref(side), self.info(side).d_model
        if ref.source == "train":
            s = self.cfg.sae
            d_sae = s.expansion * d_model
            return d_sae, s.topk if s.architecture == "topk" else min(d_sae, ASSUMED_L0)
        if ref.source == "folder":
            cfg = json.loads((Path(ref.folder(layer)).expanduser() / "cfg.json").read_text())
            d_sae = cfg.get("d_sae") or None
            k = cfg.get("k") if cfg.get("architecture") == "topk" else None
            return d_sae, int(k or min(d_sae or ASSUMED_L0, ASSUMED_L0))
        return None, ASSUMED_L0

    def planned_bytes(self, stage: str = "run") -> dict[str, tuple[int, str]]:
        """Estimated bytes the store still needs for ``stage`` and the stages before it
        (``run``: every stage), by kind, each with how it is estimated. Entries already in
        the store count nothing; corpus, tokenizer and windows are built by validation;
        outside models' weights live in the Hugging Face cache and are not counted."""
        upto = len(STAGES) if stage == "run" else STAGES.index(stage) + 1
        kinds = {STAGE_WRITES.get(s) for s in STAGES[:upto]}
        plan: dict[str, tuple[int, str]] = {}
        if "model" in kinds:
            fam, vocab = self.cfg.family, self.cfg.tokenizer.vocab_size
            todo = {m.name: m for m in (self.member(s) for s in SIDES
                                        if self.ref(s).source == "family")
                    if not self.store.has("model", member_spec(m, fam, self.family_tokenizer))}
            plan["models"] = (sum(4 * _n_params(m, vocab, fam.context) for m in todo.values()),
                              f"{len(todo)} family model(s) to train, float32 weights")
        shapes = {(side, l): self._sae_shape(side, l) for side in SIDES
                  for l in self.used_layers(side)}
        if "sae" in kinds:
            n, total = 0, 0
            for (side, layer), (d_sae, _) in shapes.items():
                d = self.info(side).d_model
                if self.sae_ref(side).source == "train" and not self.store.has(
                        "sae", sae_spec(self._planned_model_key(side), layer, self.cfg.sae,
                                        self.sae_windows_key(side))):
                    n, total = n + 1, total + 4 * (2 * d * d_sae + 2 * d_sae + d)
            plan["saes"] = (total, f"{n} SAE(s) to train, float32 encoder and decoder")
        if "codes" in kinds:
            rows = self.windows_entry.meta["n_valid_tokens"]
            sizes = []
            for (side, layer), (_, l0) in shapes.items():
                spec = codes_spec(self._planned_model_key(side), layer,
                                  self._planned_sae_key(side, layer), self.windows_entry, side)
                if not self.store.has("codes", spec):
                    sizes.append((8 * l0 + 4) * rows)  # CSR: float32 value + int32 index
            # the layer being finished holds its shards and its matrix at once
            plan["codes"] = (sum(sizes) + max(sizes, default=0),
                             f"{len(sizes)} layer(s) x {rows:,} tokens x the SAE's active "
                             f"features per token (TopK's k, else at most {ASSUMED_L0}) x 8 bytes")
        if "matches" in kinds:
            total = 0
            for la, lb in self.pairs():
                da, db = shapes[("a", la)][0], shapes[("b", lb)][0]
                if da and db:  # pairs (two int64 indices, a float32) and top activations
                    total += 20 * min(da, db) + 12 * self.cfg.match.top_k * (da + db)
            plan["matches"] = (total, f"{len(self.pairs())} layer pair(s)")
        return plan

    def relative_depth(self, side: str, layer: int) -> float:
        return (layer + 1) / self.info(side).n_layers

    def with_analysis(self, cfg: Config) -> "Pipeline":
        """A pipeline for ``cfg`` that shares this one's resolved artefacts (corpus to codes).

        ``cfg`` may differ from this pipeline's config only in the analysis sections
        (``match``, ``similarity``), so the models, SAEs and codes already resolved here
        are reused as they are: no store lookup, checksum or model load is repeated.
        """
        def upstream(c: Config) -> dict:
            return {k: v for k, v in c.to_dict().items() if k not in ANALYSIS_SECTIONS}

        mine, theirs = upstream(self.cfg), upstream(cfg)
        if mine != theirs:
            keys = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"config differs upstream of matching in {keys}; only "
                             f"{list(ANALYSIS_SECTIONS)} may differ")
        other = Pipeline(cfg, self.store)
        other._models, other._saes, other._cache = self._models, self._saes, self._cache
        for name, value in self.__dict__.items():
            if isinstance(getattr(type(self), name, None), cached_property):
                other.__dict__[name] = value
        return other


ASSUMED_L0 = 128  # active features per token assumed for an SAE that does not fix it
STAGE_WRITES = {"models": "model", "saes": "sae", "extract": "codes", "match": "matches"}


def _n_params(m, vocab: int, context: int) -> int:
    """Parameters of a family member (embeddings, attention, MLP, norms, unembedding)."""
    d, dm = m.d_model, m.d_mlp
    return 2 * vocab * d + vocab + context * d + 2 * d + m.n_layers * (
        4 * d * d + 2 * d * dm + dm + 9 * d)


def pipeline_lineage(pipe: Pipeline) -> dict[str, str]:
    """The lineage tags of a pipeline: what makes its runs reproducible.

    Code and environment (``lineage_tags``: saeuniv version, git commit and dirty flag,
    library versions), the config hash, the seeds, and what is already resolved of the
    inputs: the corpus hash (``saeuniv.corpus_hash``), the analysis token count
    (``saeuniv.n_tokens``), each side's model key (``saeuniv.model_a.key``) and SAE keys
    (``saeuniv.sae.a0``: side and layer). Nothing is computed to tag it: a key that is not
    resolved yet is left out, and the stages set these tags again when they end, so every
    key a stage resolved is on its run, with the same value on every run of the pipeline.
    """
    cfg = pipe.cfg
    tags = lineage_tags(cfg.hash())
    tags.update({"saeuniv.config_name": cfg.name,
                 "saeuniv.seed.corpus": str(cfg.corpus.seed),
                 "saeuniv.seed.family": str(cfg.family.seed),
                 "saeuniv.seed.sae": str(cfg.sae.seed),
                 "saeuniv.seed.similarity": str(cfg.similarity.seed),
                 "saeuniv.seed.subspaces": str(cfg.subspaces.seed)})
    resolved = pipe.__dict__
    if "corpus" in resolved:
        tags["saeuniv.corpus_hash"] = pipe.corpus.meta["source_hash"]
    if "windows_entry" in resolved:
        tags["saeuniv.n_tokens"] = str(pipe.windows_entry.meta["n_valid_tokens"])
    for side in SIDES:
        family = pipe.ref(side).source == "family"
        if ("model_entries" in resolved) if family else (("id", side) in pipe._cache):
            tags[f"saeuniv.model_{side}.key"] = pipe.model_key(side)
        trained = pipe.sae_ref(side).source == "train"
        if trained and ("saes", side) in pipe._cache:
            layers = pipe._cache[("saes", side)]
        else:
            layers = [k[2] for k in pipe._cache if k[:2] == ("saekey", side)]
        for layer in sorted(layers):
            tags[f"saeuniv.sae.{side}{layer}"] = pipe.sae_key(side, layer)
    return tags


def load_top(entry: Entry) -> tuple[matching.TopActivations, matching.TopActivations]:
    """The top activations of every A and B feature stored with a matches entry."""
    with np.load(entry.file("top.npz")) as npz:  # each array read once
        return (matching.TopActivations(npz["rows_a"], npz["values_a"]),
                matching.TopActivations(npz["rows_b"], npz["values_b"]))


def load_matches(entry: Entry) -> matching.Matches:
    data = np.load(entry.file("pairs.npz"))
    return matching.Matches(data["a"], data["b"], data["corr"])


def _filter_pairs(pipe: Pipeline, m: matching.Matches, top_a: matching.TopActivations,
                  top_b: matching.TopActivations, counts: dict | None = None) -> matching.Matches:
    """The token filters of ``match`` (junk tokens, shared top token) on thresholded pairs;
    ``counts`` gets the pairs left after each (``n_junk``, ``n_shared_token``)."""
    mc, counts = pipe.cfg.match, {} if counts is None else counts
    tok_a, tok_b = top_a.tokens(pipe.token_ids("a")), top_b.tokens(pipe.token_ids("b"))
    if mc.junk_filter:  # each side's own junk tokens, as 0/1 flags per top activation
        flag_a = np.where(tok_a >= 0, np.isin(tok_a, pipe.junk_ids("a")), -1).astype(np.int64)
        flag_b = np.where(tok_b >= 0, np.isin(tok_b, pipe.junk_ids("b")), -1).astype(np.int64)
        m = matching.junk_filter(m, flag_a, flag_b, [1])
    counts["n_junk"] = m.n
    if mc.shared_token:  # compare token text, so two tokenizers share one id space
        text_a, text_b = pipe.token_text("a", tok_a), pipe.token_text("b", tok_b)
        vocab = {t: i for i, t in enumerate(sorted(set(text_a.ravel()) | set(text_b.ravel())))}
        ids = lambda text, tok: np.where(tok >= 0, np.vectorize(vocab.get, otypes=[np.int64])(
            text), -1)
        m = matching.shared_token_filter(m, ids(text_a, tok_a), ids(text_b, tok_b))
    counts["n_shared_token"] = m.n
    return m


def _build_matches(pipe: Pipeline, ca: Entry, cb: Entry, out: Path) -> dict:
    mc = pipe.cfg.match
    codes_a, codes_b = pipe.analysis_codes(ca), pipe.analysis_codes(cb)
    corr = matching.correlation(codes_a, codes_b)
    counts = {"n_tokens": int(codes_a.shape[0]),
              "n_dead_a": int(matching.dead_features(codes_a).sum()),
              "n_dead_b": int(matching.dead_features(codes_b).sum())}
    m = matching.match(corr, policy=mc.policy, threshold=-1.0)
    counts["n_policy"] = m.n
    counts["mean_corr_before"] = m.mean_corr
    m = m.take(m.corr > mc.threshold)
    counts["n_threshold"] = m.n
    top_a = matching.top_activations(codes_a, mc.top_k)
    top_b = matching.top_activations(codes_b, mc.top_k)
    m = _filter_pairs(pipe, m, top_a, top_b, counts)
    counts["n_pairs"] = m.n
    counts["mean_corr_after"] = m.mean_corr
    counts["unique_a_fraction"] = m.unique_a_fraction
    np.savez(out / "pairs.npz", a=m.a, b=m.b, corr=m.corr)
    np.savez(out / "top.npz", rows_a=top_a.rows, values_a=top_a.values, rows_b=top_b.rows,
             values_b=top_b.values)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in counts.items()}


def _decoder(sae) -> np.ndarray:
    return sae.W_dec.detach().double().numpy()


def _build_scores(pipe: Pipeline, la: int, lb: int, m_entry: Entry, out: Path) -> dict:
    sim = pipe.cfg.similarity
    m = load_matches(m_entry)
    result = {"layer_a": la, "layer_b": lb, "n_pairs": m.n, "metrics": {}, "status": "ok"}
    if m.n < sim.min_pairs:
        result["status"] = (f"too few pairs ({m.n} < similarity.min_pairs={sim.min_pairs}); "
                            "lower match.threshold or similarity.min_pairs")
    else:
        A = _decoder(pipe.sae("a", la)[1])[m.a]
        B = _decoder(pipe.sae("b", lb)[1])[m.b]
        for name in sim.metrics:
            kwargs = {"variance": sim.variance} if name in ("svcca", "pwcca") else {}
            try:
                null = metrics.permutation_null(name, A, B, n_perm=sim.n_perm, seed=sim.seed,
                                                **kwargs)
            except ValueError as err:  # e.g. fewer pairs than SVCCA directions
                result["metrics"][name] = {"error": str(err)}
                continue
            if not np.isfinite(null.observed):
                result["metrics"][name] = {"error": f"{name} came out {null.observed} on "
                                                    f"{m.n} pairs (degenerate decoder rows)"}
                continue
            result["metrics"][name] = {
                "observed": null.observed, "null_mean": null.null_mean, "null_sd": null.null_sd,
                "z": null.z, "p": null.p, "n_perm": null.n_perm, "seed": null.seed}
        if "svcca" in sim.metrics and "error" not in result["metrics"]["svcca"]:
            d = metrics.svcca_details(A, B, variance=sim.variance)
            result["metrics"]["svcca"].update(k_a=d.k_a, k_b=d.k_b)
            result["metrics"]["svcca"]["lan_compatible"] = metrics.svcca(A, B, lan_compatible=True)
    (out / "scores.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return {"status": result["status"], "n_pairs": m.n}


def load_labels(entry: Entry, min_hits: int) -> tuple[subspaces.Labels,
                                                      matching.TopActivations]:
    """A labels entry: the labels (members: ``min_hits`` or more hits) and top activations."""
    with np.load(entry.file("labels.npz")) as npz:
        data = dict(npz)
    lab = subspaces.Labels(data["hits"], data["phrase"], data["hits"] >= min_hits,
                           data["rows"].shape[1])
    return lab, matching.TopActivations(data["rows"], data["values"])


def _build_subspaces(pipe: Pipeline, la: int, lb: int, lab_a: Entry, lab_b: Entry,
                     m_entry: Entry, out: Path) -> dict:
    sub, mc = pipe.cfg.subspaces, pipe.cfg.match
    codes_a = pipe.analysis_codes(pipe.all_codes["a"][la])
    codes_b = pipe.analysis_codes(pipe.all_codes["b"][lb])
    dec_a, dec_b = _decoder(pipe.sae("a", la)[1]), _decoder(pipe.sae("b", lb)[1])
    pool = load_matches(m_entry)
    top_a, top_b = load_top(m_entry)  # the token filters' top activations
    member_a = load_labels(lab_a, sub.min_hits)[0].member
    member_b = load_labels(lab_b, sub.min_hits)[0].member
    result = {"layer_a": la, "layer_b": lb, "n_pool": pool.n, "categories": []}
    pairs = {}
    for c, cat in enumerate(pipe.concepts.categories):
        fa, fb = np.flatnonzero(member_a[:, c]), np.flatnonzero(member_b[:, c])
        corr = (matching.correlation(codes_a[:, fa], codes_b[:, fb]) if fa.size and fb.size
                else np.zeros((fa.size, fb.size)))
        m = _filter_pairs(pipe, subspaces.category_pairs(corr, fa, fb, mc.policy,
                                                         mc.threshold), top_a, top_b)
        score = subspaces.score_category(
            cat, dec_a, dec_b, m, fa.size, fb.size, pool.a, pool.b, sub.metrics, sub.n_perm,
            sub.seed, sub.min_pairs, sub.svcca_k, sub.cka_debiased)
        result["categories"].append(asdict(score))
        pairs.update({f"{cat}.a": m.a, f"{cat}.b": m.b, f"{cat}.corr": m.corr})
    np.savez(out / "pairs.npz", **pairs)
    (out / "subspaces.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return {"n_scored": sum(c["status"] == "ok" for c in result["categories"])}


def load_subspaces(entry: Entry) -> dict:
    return json.loads(entry.file("subspaces.json").read_text())


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def load_scores(entry: Entry) -> dict:
    return json.loads(entry.file("scores.json").read_text())


# -- stage functions: each logs into the active MLflow run ------------------

def pair_key(la: int, lb: int) -> str:
    return f"a{la}-b{lb}"


def _warn(key: str, msg: str) -> None:
    """A problem that does not stop the stage but must not pass unseen: a log line and a
    ``saeuniv.warning.<key>`` tag on the active run."""
    log.warning(msg)
    mlflow.set_tag(f"saeuniv.warning.{key}", msg[:4900])


def stage_models(pipe: Pipeline) -> None:
    for name, entry in pipe.model_entries.items():
        meta = entry.meta
        for step, value in meta["val_curve"]:
            mlflow.log_metric(f"val_loss_{name}", value, step=step)
        mlflow.log_metrics({f"params_{name}": meta["params"],
                            f"non_embedding_params_{name}": meta["non_embedding_params"]})
        mlflow.set_tag(f"saeuniv.model.{name}", entry.key)
    for side in SIDES:
        info, ref = pipe.info(side), pipe.ref(side)
        mlflow.log_metrics({f"n_layers_{side}": info.n_layers, f"d_model_{side}": info.d_model})
        mlflow.set_tags({f"saeuniv.model_{side}": f"{ref.source}:{info.name}",
                         f"saeuniv.model_{side}.key": pipe.model_key(side),
                         f"saeuniv.tokenizer_{side}": tokenizer_sha(pipe.tokenizer_entry(side))})
    if all(pipe.model_entry(s) is not None for s in SIDES):
        a, b = pipe.model_entry("a").meta, pipe.model_entry("b").meta
        mlflow.log_metrics({"param_ratio": b["params"] / a["params"],
                            "val_loss_gap": a["val_loss"] - b["val_loss"]})
    mlflow.set_tag("saeuniv.corpus_hash", pipe.corpus.meta["source_hash"])


PREFLIGHT_TOKENS = 256
BAD_FVU = 0.5


def stage_saes(pipe: Pipeline) -> None:
    """Train or fetch every SAE, check it against its model, and measure it on a few
    hundred analysis tokens before the long extraction."""
    for side in SIDES:
        for layer in pipe.used_layers(side):
            key, sae = pipe.sae(side, layer)
            mlflow.log_metric(f"sae_d_sae_{side}", sae.cfg.d_sae, step=layer)
            mlflow.set_tag(f"saeuniv.sae.{side}{layer}", key)
        for layer, q in preflight(pipe, side).items():
            mlflow.log_metrics({f"sae_preflight_fvu_{side}": q.fvu,
                                f"sae_preflight_l0_{side}": q.l0}, step=layer)
            if q.fvu > BAD_FVU:
                msg = (f"SAE {side} layer {layer} reconstructs badly on {q.n_tokens} tokens: "
                       f"FVU {q.fvu:.2f}, variance explained {1 - q.fvu:.2f}"
                       + (" (NEGATIVE: worse than predicting the mean)" if q.fvu > 1 else "")
                       + "; check that the SAE belongs to this model, layer and dtype")
                _warn(f"sae_{side}{layer}", msg)


def preflight(pipe: Pipeline, side: str, n_tokens: int = PREFLIGHT_TOKENS) -> dict:
    """SAE quality (L0, FVU, dead fraction) per layer on the first analysis tokens,
    cached in the store so a warm run loads no model."""
    layers = pipe.used_layers(side)
    spec = {"model": pipe.model_key(side), "windows": pipe.windows_entry.key, "side": side,
            "saes": {str(l): pipe.sae_key(side, l) for l in layers}, "n_tokens": n_tokens}

    @torch.no_grad()
    def build(out: Path) -> dict:
        win = pipe.windows(side)
        rows = int(np.searchsorted(np.cumsum(win.mask.sum(1)), n_tokens)) + 1
        model = pipe.model(side)
        res = model.residuals(torch.as_tensor(win.tokens[:rows], dtype=torch.long), layers)
        keep = torch.as_tensor(win.mask[:rows]).to(model.device)
        result = {}
        for layer in layers:
            acts = res[layer][keep].float()
            check_finite(acts, f"model {side}:{pipe.name(side)} layer {layer}: activations on "
                         f"the first {n_tokens} analysis tokens", NONFINITE_FIX)
            sae = pipe.sae(side, layer)[1].to(model.device)
            result[str(layer)] = asdict(quality(sae, acts))
            sae.to("cpu")
        return result

    entry, _ = pipe.store.get_or_create("preflight", spec, build)
    return {int(l): Quality(**q) for l, q in entry.meta.items()}


def stage_extract(pipe: Pipeline) -> None:
    for side, layer, q in _log_quality(pipe):
        if q["dead_fraction"] >= 1:
            _warn(f"dead_{side}{layer}", f"every feature of SAE {side} layer {layer} is dead on "
                  f"the {q['n_tokens']} analysis tokens (all codes are zero): none of this "
                  "layer's features can be matched; check that the SAE belongs to this model, "
                  "layer and dtype")
        elif q["fvu"] > BAD_FVU:
            log.warning("SAE %s layer %d reconstructs badly: FVU %.2f (variance explained "
                        "%.2f); its features are unreliable", side, layer, q["fvu"], 1 - q["fvu"])


def _log_quality(pipe: Pipeline) -> list[tuple[str, int, dict]]:
    """Log token count and per-layer SAE quality (L0, FVU, dead fraction, step = layer)."""
    mlflow.log_metric("n_tokens", pipe.windows_entry.meta["n_valid_tokens"])
    mlflow.set_tag("saeuniv.windows", pipe.windows_entry.key)
    out = []
    for side, layer_codes in pipe.all_codes.items():
        for layer, entry in layer_codes.items():
            q = entry.meta["quality"]
            mlflow.log_metrics({f"sae_l0_{side}": q["l0"], f"sae_fvu_{side}": q["fvu"],
                                f"sae_dead_{side}": q["dead_fraction"]}, step=layer)
            out.append((side, layer, q))
    return out


def stage_match(pipe: Pipeline) -> None:
    rows = []
    for la, lb in tqdm(pipe.pairs(), desc="match", unit="layer pair"):
        entry = pipe.matches(la, lb)
        key = pair_key(la, lb)
        meta = entry.meta
        mlflow.log_metrics({f"{k}/{key}": v for k, v in meta.items() if v is not None})
        if meta["n_pairs"] == 0:
            _warn(f"match.{key}", f"A layer {la} / B layer {lb}: no pairs left after matching "
                  f"({meta['n_policy']} by policy {pipe.cfg.match.policy}, {meta['n_threshold']} "
                  f"above match.threshold={pipe.cfg.match.threshold}, {meta['n_junk']} after the "
                  f"junk filter; dead or constant features: {meta['n_dead_a']} of A, "
                  f"{meta['n_dead_b']} of B); lower match.threshold, or check the SAEs")
        rows += _top_pairs(pipe, la, lb, entry, 10)
    if rows:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "top_pairs.json")


def _top_pairs(pipe: Pipeline, la: int, lb: int, entry: Entry, n: int | None) -> list[dict]:
    m = load_matches(entry)
    rows_a, rows_b = (t.rows for t in load_top(entry))
    order = np.argsort(-m.corr)[:n]

    def words(side, rows):
        text = pipe.row_text(side)
        return " | ".join(repr(text[r]) for r in rows if r >= 0)

    def context(side, row):
        return pipe.context(int(row), side) if row >= 0 else ""

    return [{"layer_a": la, "layer_b": lb, "a": int(m.a[i]), "b": int(m.b[i]),
             "corr": round(float(m.corr[i]), 4), "top_tokens_a": words("a", rows_a[m.a[i]]),
             "top_tokens_b": words("b", rows_b[m.b[i]]),
             "context_a": context("a", rows_a[m.a[i], 0]),
             "context_b": context("b", rows_b[m.b[i], 0])} for i in order]


def stage_similarity(pipe: Pipeline) -> None:
    for la, lb in tqdm(pipe.pairs(), desc="similarity", unit="layer pair"):
        scores = load_scores(pipe.scores(la, lb))
        log_scores(scores, pair_key(la, lb))


def log_scores(scores: dict, key: str) -> None:
    out = {f"n_pairs/{key}": scores["n_pairs"]}
    if scores.get("status", "ok") != "ok":
        _warn(f"scores.{key}", f"A layer {scores['layer_a']} / B layer {scores['layer_b']} not "
              f"scored: {scores['status']}")
    for name, r in scores["metrics"].items():
        if "error" in r:
            mlflow.set_tag(f"saeuniv.error.{name}.{key}", r["error"][:500])
            continue
        out[f"{name}/{key}"] = r["observed"]
        for field in ("null_mean", "z", "p", "k_a", "k_b", "lan_compatible"):
            if field in r and r[field] is not None and np.isfinite(r[field]):
                out[f"{name}_{field}/{key}"] = r[field]
    mlflow.log_metrics(out)


SUBSPACE_FIELDS = ("layer_a", "layer_b", "category", "n_features_a", "n_features_b",
                   "n_pairs", "status", "metric", "observed", "svcca_k", "shuffle_mean",
                   "shuffle_z", "shuffle_p", "shuffle_q", "random_mean", "random_sd",
                   "random_z", "random_p", "random_q", "significant")
ALPHA = 0.05


def subspace_table(results: list[dict]) -> list[dict]:
    """One row per (layer pair, category, metric) from stored subspace results, with
    Benjamini-Hochberg q-values per metric and null over every scored row, and
    ``significant``: q < 0.05 against both nulls."""
    rows = []
    for res in results:
        for cat in res["categories"]:
            base = {"layer_a": res["layer_a"], "layer_b": res["layer_b"],
                    "category": cat["category"], "n_features_a": cat["n_features_a"],
                    "n_features_b": cat["n_features_b"], "n_pairs": cat["n_pairs"],
                    "status": cat["status"]}
            if cat["status"] != "ok":
                rows.append({**base, "metric": ""})
                continue
            for name, r in cat["metrics"].items():
                if "error" in r:
                    rows.append({**base, "metric": name, "status": r["error"]})
                    continue
                rows.append({**base, "metric": name, "observed": r["observed"],
                             "svcca_k": r.get("k"),
                             "shuffle_mean": r["shuffle"]["null_mean"],
                             "shuffle_z": r["shuffle"]["z"], "shuffle_p": r["shuffle"]["p"],
                             "random_mean": r["random"]["null_mean"],
                             "random_sd": r["random"]["null_sd"],
                             "random_z": r["random"]["z"], "random_p": r["random"]["p"]})
    for name in {r["metric"] for r in rows if "observed" in r}:
        scored = [r for r in rows if r["metric"] == name and "observed" in r]
        for null in ("shuffle", "random"):
            q = subspaces.fdr_bh([r[f"{null}_p"] for r in scored])
            for r, v in zip(scored, q):
                r[f"{null}_q"] = float(v)
        for r in scored:
            r["significant"] = bool(r["shuffle_q"] < ALPHA and r["random_q"] < ALPHA)
    return [{k: r.get(k) for k in SUBSPACE_FIELDS} for r in rows]


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _labelled_rows(pipe: Pipeline, la: int, lb: int, pairs_npz: dict) -> list[dict]:
    """Every labelled feature of A at ``la`` and B at ``lb``, per category: the phrase it
    hit most, how many of its top-k did, its partner in the category and top contexts."""
    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    out = []
    for side, layer, other in (("a", la, "b"), ("b", lb, "a")):
        lab, top = load_labels(pipe.labels(side, layer), sub.min_hits)
        tok = pipe.tokenizer(side)
        for c, cat in enumerate(concepts.categories):
            mine, theirs = pairs_npz[f"{cat}.{side}"], pairs_npz[f"{cat}.{other}"]
            corr = pairs_npz[f"{cat}.corr"]
            for f in lab.features(c):
                phrase = concepts.phrases[c][lab.phrase[f, c]]
                n_tok = pipe._memo(("ntok", side, phrase), lambda: len(
                    tok.encode(" " + phrase, add_special_tokens=False)))
                where = np.flatnonzero(mine == f)
                contexts = [pipe.context(int(r), side, sub.context, sub.context)
                            for r in top.rows[f] if r >= 0]
                out.append({"side": side, "layer": layer, "feature": int(f), "category": cat,
                            "phrase": phrase, "hits": int(lab.hits[f, c]), "top_k": lab.top_k,
                            "multi_word": concepts.multi_word(c, int(lab.phrase[f, c])),
                            "phrase_tokens": n_tok,
                            "partner": int(theirs[where[0]]) if where.size else "",
                            "corr": round(float(corr[where[0]]), 4) if where.size else "",
                            "top_contexts": " || ".join(contexts)})
    return out


def stage_subspaces(pipe: Pipeline) -> None:
    """Label features by concept, score each category at each layer pair against both
    nulls, and log one nested run per layer pair plus the overall table and summary."""
    from .plots import category_bars, plt, subspace_grid

    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    mlflow.log_params({f"subspaces.{k}": (json.dumps(list(v)) if isinstance(v, tuple) else v)
                       for k, v in asdict(sub).items()})
    mlflow.log_dict({"name": concepts.name, "categories": {
        c: list(p) for c, p in zip(concepts.categories, concepts.phrases)}}, "concepts.yaml")
    pairs = pipe.subspace_pairs()
    entries = {pair: pipe.subspace_scores(*pair)
               for pair in tqdm(pairs, desc="subspaces", unit="layer pair")}
    results = {pair: load_subspaces(e) for pair, e in entries.items()}
    table = subspace_table(list(results.values()))
    for (la, lb), entry in entries.items():
        key = pair_key(la, lb)
        rows = [r for r in table if (r["layer_a"], r["layer_b"]) == (la, lb)]
        with stage_run("subspaces.pair", run_name=f"subspaces:{key}",
                       tags={"saeuniv.layer_a": str(la), "saeuniv.layer_b": str(lb),
                             "saeuniv.concepts": concepts.name}):
            mlflow.log_params({"layer_a": la, "layer_b": lb})
            out = {}
            for r in rows:
                cat = _metric_name(r["category"])
                out.update({f"concept_pairs/{cat}": r["n_pairs"],
                            f"concept_features_a/{cat}": r["n_features_a"],
                            f"concept_features_b/{cat}": r["n_features_b"]})
                if r["observed"] is None:
                    continue
                m = r["metric"]
                for field in ("observed", "shuffle_z", "shuffle_p", "random_mean", "random_z",
                              "random_p", "random_q"):
                    v = r[field]
                    if v is not None and np.isfinite(v):
                        suffix = "" if field == "observed" else "_" + field
                        out[f"concept_{m}{suffix}/{cat}"] = v
            mlflow.log_metrics(out)
            mlflow.log_table({k: [r[k] for r in rows] for k in SUBSPACE_FIELDS},
                             "categories.json")
            fig = category_bars(rows, f"{pipe.name('a')} layer {la} vs {pipe.name('b')} "
                                f"layer {lb}: concept subspaces (n_perm={sub.n_perm})")
            mlflow.log_figure(fig, "categories.png")
            plt.close(fig)
            with np.load(entry.file("pairs.npz")) as npz:
                pairs_npz = dict(npz)
            mlflow.log_text(_csv(_labelled_rows(pipe, la, lb, pairs_npz)),
                            "labelled_features.csv")
    mlflow.log_text(_csv(table), "subspaces.csv")
    for name in sub.metrics:
        fig = subspace_grid(table, name, list(concepts.categories), pipe.layers("a"),
                            pipe.layers("b"), f"{name} of concept subspaces: z against random "
                            "subspaces (* q < 0.05 against both nulls; blank: too few pairs)")
        mlflow.log_figure(fig, f"subspaces_{name}.png")
        plt.close(fig)
    summary = _subspace_summary(pipe, table, pairs)
    mlflow.log_text(summary, "subspaces_summary.md")
    mlflow.set_tag("mlflow.note.content", summary)
    mlflow.log_metrics({f"concept_significant/{name}": sum(
        bool(r["significant"]) for r in table if r["metric"] == name) for name in sub.metrics})


def _subspace_summary(pipe: Pipeline, table: list[dict], pairs) -> str:
    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    directions = (f"{sub.svcca_k} directions" if sub.svcca_k
                  else "a quarter of the pairs as directions (at least 2)")
    cka = ("debiased" if sub.cka_debiased
           else "biased (near 1 for few pairs in many dimensions)")
    lines = [f"# Concept subspaces: {pipe.name('a')} vs {pipe.name('b')}", "",
             f"- concept set `{concepts.name}`: {len(concepts.categories)} categories; a feature "
             f"belongs to a category when {sub.min_hits} or more of its top {sub.top_k} "
             "activations fall inside one of its phrases",
             f"- {len(pairs)} layer pairs; pairs within a category by {pipe.cfg.match.policy}, "
             f"correlation > {pipe.cfg.match.threshold}; categories with fewer than "
             f"{sub.min_pairs} pairs are not scored",
             f"- SVCCA keeps {directions}; CKA is {cka}",
             f"- nulls: {sub.n_perm} shuffled pairings and {sub.n_perm} random subspaces of the "
             f"same size (seed {sub.seed}); significant = Benjamini-Hochberg q < {ALPHA} "
             "against both, over all layer pairs and categories of a metric", ""]
    for name in sub.metrics:
        rows = [r for r in table if r["metric"] == name and r["observed"] is not None]
        sig = [r for r in rows if r["significant"]]
        lines.append(f"## {name}: {len(sig)} of {len(rows)} scored (category, layer pair) "
                     "cells significant")
        for cat in concepts.categories:
            mine = [r for r in rows if r["category"] == cat]
            hits = [r for r in mine if r["significant"]]
            if not mine:
                lines.append(f"- {cat}: never enough pairs to score")
                continue
            best = max(mine, key=lambda r: -np.inf if r["random_z"] is None
                       or not np.isfinite(r["random_z"]) else r["random_z"])
            lines.append(
                f"- {cat}: significant at {len(hits)}/{len(mine)} layer pairs; highest z vs "
                f"random at A{best['layer_a']}/B{best['layer_b']}: {best['observed']:.3f} "
                f"(random {best['random_mean']:.3f}, z {best['random_z']:.1f}, q "
                f"{best['random_q']:.3g}; shuffle q {best['shuffle_q']:.3g})")
        lines.append("")
    skipped = sorted({r["category"] for r in table if r["status"] != "ok"})
    if skipped:
        lines.append("Too few pairs somewhere: " + ", ".join(skipped))
    return "\n".join(lines) + "\n"


STAGE_FUNCS: dict[str, Callable[[Pipeline], None]] = {
    "models": stage_models, "saes": stage_saes, "extract": stage_extract,
    "match": stage_match, "similarity": stage_similarity, "subspaces": stage_subspaces,
}


# What each stage depends on: the config sections that decide its output, and the store
# kinds it builds (recomputed under --force).
_UPSTREAM = ("corpus", "tokenizer", "family", "model_a", "model_b")
_SAES = _UPSTREAM + ("layers_a", "layers_b", "pairs", "sae_a", "sae_b", "sae", "extract")
STAGE_SECTIONS = {"models": _UPSTREAM, "saes": _SAES, "extract": _SAES,
                  "match": _SAES + ("match",), "similarity": _SAES + ("match", "similarity"),
                  "subspaces": _SAES + ("match", "subspaces")}
STAGE_KINDS = {"models": {"corpus", "tokenizer", "model"}, "saes": {"sae", "preflight"},
               "extract": {"windows", "codes"}, "match": {"matches"},
               "similarity": {"scores"}, "subspaces": {"labels", "subspaces"}}


def inputs_hash(cfg: Config, stage: str) -> str:
    """Digest of what a stage's result depends on: its config sections and the code."""
    data = cfg.to_dict()
    spec = {"stage": stage, "config": {k: data[k] for k in STAGE_SECTIONS[stage]},
            "code": code_version()}
    if stage == "subspaces":  # the concept set's content, not only its name
        spec["concepts"] = asdict(load_concepts(cfg.subspaces.concepts))
    return digest(spec)


def reusable_run(stage: str, inputs: str):
    """The latest FINISHED run of ``stage`` with these inputs whose artefacts are intact
    (checked against its ``artifacts.sha256.json``), in the active run's experiment."""
    from .audit import audit

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    found = client.search_runs(
        [active.info.experiment_id],
        filter_string=(f"tags.saeuniv.inputs_hash = '{inputs}' and tags.saeuniv.stage = "
                       f"'{stage}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in found:
        if run.info.run_id == active.info.run_id:
            continue
        result = audit(run.info.run_id)
        if result.intact:
            return run
        log.warning("not reusing %s run %s: %s", stage, run.info.run_id,
                    "; ".join(result.problems))
    return None


def reuse_run(source) -> None:
    """Copy a finished run's metrics (every step), artefacts and stage tags into the
    active run and tag ``saeuniv.reused_from``."""
    import tempfile

    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    history = [Metric(m.key, m.value, m.timestamp, m.step) for key in source.data.metrics
               for m in client.get_metric_history(source.info.run_id, key)]
    for i in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[i:i + 1000])
    own = mlflow.get_run(run_id).data.tags
    mlflow.set_tags({k: v for k, v in source.data.tags.items()
                     if k.startswith("saeuniv.") and k not in own
                     and k not in ("saeuniv.reused_from", "saeuniv.error")})
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(source.info.run_id, "", tmp))
        (local / CHECKSUMS).unlink(missing_ok=True)
        if any(local.iterdir()):
            mlflow.log_artifacts(str(local))
    mlflow.set_tag("saeuniv.reused_from", source.info.run_id)


def run_stage(stage: str, pipe: Pipeline, force: bool = False) -> None:
    """Run one stage inside its own MLflow run (nested when a parent is active).

    The pipeline is validated first (``Pipeline.validate``), so bad input fails the run in
    seconds. A FINISHED run of the same stage with the same ``saeuniv.inputs_hash`` and intact
    artefacts is reused (its metrics, artefacts and tags copied, ``saeuniv.reused_from``
    set) instead of recomputing. ``force`` recomputes: no reuse, and the stage's store
    entries are rebuilt and overwritten.
    """
    inputs = inputs_hash(pipe.cfg, stage)
    with stage_run(stage, tags={**pipeline_lineage(pipe), "saeuniv.inputs_hash": inputs}):
        mlflow.log_params({"config_name": pipe.cfg.name, "config_hash": pipe.cfg.hash()})
        pipe.validate(stage)
        source = None if force else reusable_run(stage, inputs)
        if source is not None:
            log.info("stage %s: reusing run %s (same inputs and code)", stage,
                     source.info.run_id)
            reuse_run(source)
            return
        if force:
            pipe.store.force |= STAGE_KINDS[stage]
        STAGE_FUNCS[stage](pipe)
        mlflow.set_tags(pipeline_lineage(pipe))  # the keys this stage resolved


def flat_params(cfg: Config) -> dict[str, str]:
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, (list, dict)) else str(node)

    walk("", cfg.to_dict())
    return out


def run_main(cfg: Config, store: Store | None = None, launcher: Callable | None = None,
             force: bool = False) -> str:
    """The whole pipeline as one parent run with a nested child run per stage.

    ``launcher(stage, pipe)`` runs a stage; by default in this process (``run_stage``,
    reusing a finished stage run with the same inputs unless ``force``). Returns the
    parent run id.
    """
    pipe = Pipeline(cfg, store)
    if force:  # every entry recomputed once, from the corpus on
        pipe.store.force |= set().union(*STAGE_KINDS.values())
    launch = launcher or (lambda stage, p: run_stage(stage, p, force=force))
    with stage_run("main", run_name=f"main:{cfg.name}", tags=pipeline_lineage(pipe)) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(cfg.to_dict(), "config.yaml")
        pipe.validate()
        mlflow.set_tags(pipeline_lineage(pipe))
        for stage in STAGES:
            launch(stage, pipe)
        report(pipe)
        mlflow.set_tags(pipeline_lineage(pipe))
        return run.info.run_id


# -- the parent run's report ----------------------------------------------------

def grids(pipe: Pipeline) -> dict:
    """metric -> field -> (n_a, n_b) nested lists, from the stored scores."""
    la_list, lb_list = pipe.layers("a"), pipe.layers("b")
    out: dict = {"layers_a": la_list, "layers_b": lb_list, "n_pairs": [], "metrics": {}}
    fields = ("observed", "null_mean", "null_sd", "z", "p")
    for name in pipe.cfg.similarity.metrics:
        out["metrics"][name] = {f: np.full((len(la_list), len(lb_list)), np.nan) for f in fields}
    n_pairs = np.full((len(la_list), len(lb_list)), -1, dtype=int)  # -1: not compared
    problems = {}  # "aI-bJ" -> why the pair (or one of its metrics) has no score
    for la, lb in pipe.pairs():
        i, j = la_list.index(la), lb_list.index(lb)
        s = load_scores(pipe.scores(la, lb))
        n_pairs[i, j] = s["n_pairs"]
        why = [s["status"]] if s.get("status", "ok") != "ok" else []
        for name, r in s["metrics"].items():
            if "error" in r:
                why.append(f"{name}: {r['error']}")
            for f in fields:
                if f in r and r[f] is not None:
                    out["metrics"][name][f][i, j] = r[f]
        if why:
            problems[pair_key(la, lb)] = "; ".join(why)
    out["n_pairs"] = n_pairs
    out["problems"] = problems
    return out


def _nan_to_none(x):
    if isinstance(x, np.ndarray):
        return [_nan_to_none(v) for v in x.tolist()]
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


REPORT_PAIRS = 5  # top matched pairs per layer pair in report.html


def report(pipe: Pipeline) -> None:
    """Log the grids, heatmaps, per-layer curves, pairs table, summary and the
    self-contained ``report.html`` on the active run."""
    from .htmlreport import png_base64, render
    from .plots import depth_curves, heatmap, plt

    g = grids(pipe)
    la_list, lb_list = g["layers_a"], g["layers_b"]
    name_a, name_b = pipe.name("a"), pipe.name("b")
    for la, lb in pipe.pairs():
        log_scores(load_scores(pipe.scores(la, lb)), pair_key(la, lb))
    quality = _log_quality(pipe)
    mlflow.log_dict(_nan_to_none(g), "grids.json")
    images = {}
    # per-layer curves: each A layer against the B layer at the nearest relative depth
    curves = {}
    for name, fields in g["metrics"].items():
        xs, ys, ms, sds = [], [], [], []
        for i, la in enumerate(la_list):
            j = lb_list.index(pipe.nearest_b(la))
            obs = fields["observed"][i, j]
            if np.isfinite(obs):
                mlflow.log_metrics({name: obs, f"{name}_null_mean": fields["null_mean"][i, j],
                                    f"{name}_z": fields["z"][i, j], f"{name}_p": fields["p"][i, j]},
                                   step=la)
            xs.append(pipe.relative_depth("a", la))
            ys.append(obs)
            ms.append(fields["null_mean"][i, j])
            sds.append(fields["null_sd"][i, j])
        curves[name] = tuple(np.asarray(v, float) for v in (xs, ys, ms, sds))
        fig = heatmap(fields["observed"], la_list, lb_list,
                      f"{name}: {name_a} vs {name_b} (n_perm={pipe.cfg.similarity.n_perm})",
                      name_a, name_b, pvalues=fields["p"])
        mlflow.log_figure(fig, f"heatmap_{name}.png")
        images[name] = png_base64(fig)
        plt.close(fig)
    fig = depth_curves(curves, f"{name_a} vs {name_b}, B layer at matching relative depth")
    mlflow.log_figure(fig, "depth_curves.png")
    curves_png = png_base64(fig)
    plt.close(fig)
    mlflow.log_text(_pairs_csv(pipe), "matched_pairs.csv")
    summary = _summary(pipe, g)
    mlflow.log_text(summary, "summary.md")
    mlflow.set_tag("mlflow.note.content", summary)
    top = [row for la, lb in pipe.pairs()
           for row in _top_pairs(pipe, la, lb, pipe.matches(la, lb), REPORT_PAIRS)]
    mlflow.log_text(render(f"saeuniv: {name_a} vs {name_b}", summary, images, curves_png,
                           quality, top), "report.html")


def _pairs_csv(pipe: Pipeline) -> str:
    return _csv([row for la, lb in pipe.pairs()
                 for row in _top_pairs(pipe, la, lb, pipe.matches(la, lb), None)])


def _subspace_lines(pipe: Pipeline) -> list[str]:
    """The concept-subspace counts for the main summary (see the subspaces run for more)."""
    table = subspace_table([load_subspaces(pipe.subspace_scores(la, lb))
                            for la, lb in pipe.subspace_pairs()])
    lines = ["", f"## Concept subspaces (`{pipe.concepts.name}`: significant = BH q < {ALPHA} "
             "against shuffled pairing and random subspaces)", ""]
    for name in pipe.cfg.subspaces.metrics:
        rows = [r for r in table if r["metric"] == name and r["observed"] is not None]
        per_cat = [f"{c} {sum(r['significant'] for r in rows if r['category'] == c)}/"
                   f"{sum(r['category'] == c for r in rows)}" for c in pipe.concepts.categories
                   if any(r["category"] == c for r in rows)]
        lines.append(f"- {name}: {sum(r['significant'] for r in rows)} of {len(rows)} scored "
                     f"(category, layer pair) cells" + (f"; {', '.join(per_cat)}" if per_cat
                                                         else ""))
    return lines


def _summary(pipe: Pipeline, g: dict) -> str:
    cfg = pipe.cfg

    def describe_model(side):
        entry, info = pipe.model_entry(side), pipe.info(side)
        if entry is not None:
            return (f"{info.name} ({entry.meta['params']:,} params, val loss "
                    f"{entry.meta['val_loss']:.3f})")
        ref = pipe.ref(side)
        return f"{info.name} ({ref.source}, {info.n_layers} layers x {info.d_model}, {ref.dtype})"

    def describe_saes(side):
        ref = pipe.sae_ref(side)
        if ref.source == "train":
            return f"trained here ({cfg.sae.architecture}, {cfg.sae.expansion}x)"
        return f"{ref.release} {ref.id}" if ref.source == "release" else ref.path

    shared = ("one tokenizer" if pipe.shared_tokenizer
              else "two tokenizers, compared on shared token boundaries")
    lines = [f"# saeuniv: {pipe.name('a')} vs {pipe.name('b')}", "",
             f"- models: {describe_model('a')} vs {describe_model('b')}",
             f"- corpus: {cfg.corpus.source}, {pipe.windows_entry.meta['n_valid_tokens']:,} "
             f"analysis tokens (pad/BOS dropped; {shared})",
             f"- SAEs: A {describe_saes('a')}; B {describe_saes('b')}",
             f"- matching: {cfg.match.policy}, threshold {cfg.match.threshold}, junk filter "
             f"{cfg.match.junk_filter}"
             + (f", on the first {cfg.match.n_tokens:,} tokens" if cfg.match.n_tokens else ""),
             f"- null: {cfg.similarity.n_perm} seeded permutations (seed {cfg.similarity.seed}), "
             "p = (1 + #null >= observed) / (1 + n_perm)", ""]
    for name, fields in g["metrics"].items():
        obs = fields["observed"]
        if np.all(np.isnan(obs)):
            lines.append(f"- {name}: no layer pair could be scored")
            continue
        i, j = np.unravel_index(np.nanargmax(obs), obs.shape)
        lines.append(f"- **{name}** best at A layer {g['layers_a'][i]} / B layer "
                     f"{g['layers_b'][j]}: {obs[i, j]:.3f} (null {fields['null_mean'][i, j]:.3f}, "
                     f"z {fields['z'][i, j]:.1f}, p {fields['p'][i, j]:.3g}); "
                     f"{int(np.sum(fields['p'] < 0.05))}/{int(np.sum(g['n_pairs'] >= 0))} "
                     "layer pairs have p < 0.05")
        z = fields["z"]
        if np.any(np.isfinite(z)):
            i, j = np.unravel_index(np.nanargmax(np.where(np.isfinite(z), z, -np.inf)), z.shape)
            la, lb = g["layers_a"][i], g["layers_b"][j]
            lines.append(f"  - highest z at A layer {la} / B layer {lb} (relative depth "
                         f"{pipe.relative_depth('a', la):.2f} / {pipe.relative_depth('b', lb):.2f})"
                         f": {obs[i, j]:.3f}, z {z[i, j]:.1f}")
    lines += _subspace_lines(pipe)
    lines += ["", "## Pairs kept per layer pair", "",
              "| A \\ B | " + " | ".join(str(l) for l in g["layers_b"]) + " |",
              "|---" * (len(g["layers_b"]) + 1) + "|"]
    for i, la in enumerate(g["layers_a"]):
        lines.append(f"| {la} | " + " | ".join(str(v) for v in g["n_pairs"][i]) + " |")
    if g["problems"]:
        lines += ["", "## Layer pairs without a score", ""]
        lines += [f"- {key}: {why}" for key, why in g["problems"].items()]
    return "\n".join(lines) + "\n"
