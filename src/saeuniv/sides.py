"""One model of the comparison and what is resolved from it: its tokenizer and windows, its
weights, its SAEs and its codes.

A ``Side`` ("a" or "b") resolves each artefact on first use, through the content-keyed
store: it builds what is missing and reads back what is there, so any stage can run alone
and computes nothing twice. What belongs to the side as a whole is a cached property; what
is kept per layer or per token row sits in a ``Memo``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import cached_property

import numpy as np
import torch

from . import residuals
from .config import ConfigError, MemberConfig, digest
from .core import matching
from .core.depth import relative_depth
from .corpus import read_split
from .extract import extract_codes
from .models import (
    LoadedModel,
    ModelError,
    ModelInfo,
    describe,
    load_family_model,
    load_outside_model,
    model_identity,
    outside_tokenizer,
    random_family_model,
    random_outside_model,
    resolve_device,
)
from .saes import check_compatible, load_pretrained, load_sae, sae_key, train_saes
from .store import Entry
from .tokens import Windows, load_tokenizer, load_windows, make_windows, tokenizer_sha
from .unembed import unembedding

SAE_WINDOW_MARGIN = 64 * 128  # tokens beyond sae.train_tokens cut into SAE training windows


class Memo(dict):
    """A dict that makes each missing value once: ``memo[key]`` calls ``make(key)``."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


class Side:
    """Model ``name`` ("a" or "b") of the comparison held by ``up`` (an ``Upstream``)."""

    def __init__(self, up, name: str):
        self.up, self.name = up, name
        self.ref = getattr(up.cfg, f"model_{name}")
        self.sae_ref = getattr(up.cfg, f"sae_{name}")
        self.family = self.ref.source == "family"
        self.random_init = self.ref.init == "random"
        self.trained_saes = self.sae_ref.source == "train"
        self.saes = Memo(self._load_sae)  # layer -> loaded SAE
        self.residual_rows = Memo(self._residual_rows)  # n_rows -> {layer: entry}
        self.contexts = Memo(lambda key: self._context(*key))  # (row, before, after) -> text

    @property
    def cfg(self):
        return self.up.cfg

    @property
    def store(self):
        return self.up.store

    @property
    def label(self) -> str:
        """``a:<model name>``: the side in progress bars and messages."""
        return f"{self.name}:{self.model_name}" + (" (random init)" if self.random_init else "")

    # -- text -------------------------------------------------------------------------
    @cached_property
    def tokenizer_entry(self) -> Entry:
        """The side's tokenizer in the store (the built-in family shares one)."""
        if self.family:
            return self.up.family_tokenizer
        return outside_tokenizer(self.ref, self.store, self.identity)

    @cached_property
    def bos(self) -> bool:
        """Whether the side's model reads a BOS token first."""
        return True if self.family else bool(self.tokenizer_entry.meta["bos"])

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_entry)

    @cached_property
    def windows(self) -> Windows:
        """The analysis windows as this side tokenized them."""
        return load_windows(self.up.windows_entry, self.name)

    @cached_property
    def token_ids(self) -> np.ndarray:
        """Token id of every code row (compared positions, in order), shape (n_rows,)."""
        return self.windows.tokens[self.windows.mask].astype(np.int64)

    @cached_property
    def positions(self) -> np.ndarray:
        """(window, position) of every code row, shape (n_rows, 2)."""
        return np.argwhere(self.windows.mask)

    @cached_property
    def row_text(self) -> np.ndarray:
        """Decoded text of the token at every code row (object array)."""
        return self.token_text(self.token_ids)

    def token_text(self, ids: np.ndarray) -> np.ndarray:
        """Decoded text of each token id (object array, '' for -1), for comparisons across
        tokenizers."""
        uniq, inv = np.unique(ids, return_inverse=True)
        text = np.asarray([self.tokenizer.decode([int(t)]) if t >= 0 else "" for t in uniq],
                          dtype=object)
        return text[inv].reshape(np.shape(ids))

    def context(self, row: int, before: int = 6, after: int = 2) -> str:
        """Text around code row ``row``, the token in [[brackets]]."""
        return self.contexts[(int(row), before, after)]

    def _context(self, row: int, before: int, after: int) -> str:
        win = self.windows
        w, pos = self.positions[row]
        toks = win.tokens[w]
        text = win.offsets[w, :, 1] > win.offsets[w, :, 0]

        def decode(lo, hi):
            return self.tokenizer.decode([int(t) for t in toks[lo:hi][text[lo:hi]]])

        return (decode(max(0, pos - before), pos) + "[[" + decode(pos, pos + 1) + "]]"
                + decode(pos + 1, pos + 1 + after))

    @cached_property
    def junk_ids(self) -> np.ndarray:
        """The side's junk token ids (specials, punctuation, whitespace)."""
        tok = self.tokenizer
        return matching.junk_ids([tok.decode([i]) for i in range(len(tok))],
                                 tok.all_special_ids)

    def top_tokens(self, top: matching.TopActivations) -> matching.TopTokens:
        """What the token filters know about the features of ``top``."""
        return matching.top_tokens(top, self.token_ids, self.junk_ids, self.token_text)

    def train_windows(self, n_tokens: int) -> Windows:
        """Packed training-split windows for the side's SAEs (BOS as the model reads it)."""
        context = self.cfg.family.context if self.family else self.cfg.extract.context
        docs = [d["text"] for d in read_split(self.up.corpus, "train")]
        return make_windows(docs, self.tokenizer, context, n_tokens, pack=True, bos=self.bos)

    # -- the model --------------------------------------------------------------------
    @cached_property
    def member(self) -> MemberConfig:
        """The side's member of the built-in family."""
        if not self.family:
            raise ModelError(f"model_{self.name} is not a member of the built-in family")
        return next(m for m in self.cfg.family.members if m.name == self.ref.name)

    @cached_property
    def info(self) -> ModelInfo:
        """Name, layers and width of the model, without loading its weights."""
        if self.family:
            return ModelInfo(self.member.name, self.member.n_layers, self.member.d_model)
        # reading a GGUF header takes seconds: keep the answer in the store
        entry, _ = self.store.get_or_create(
            "info", {"model": self.identity, "name": self.ref.name},
            lambda out: asdict(describe(self.ref, self.store)))
        return ModelInfo(**entry.meta)

    @property
    def model_name(self) -> str:
        return self.info.name

    @cached_property
    def layers(self) -> list[int]:
        """The side's layers of interest (``layers_a`` / ``layers_b``), checked."""
        value, n = getattr(self.cfg, f"layers_{self.name}"), self.info.n_layers
        if value == "all":
            layers = list(range(n))
        elif isinstance(value, str):  # stride:N
            layers = list(range(0, n, int(value.split(":")[1])))
        else:
            layers = list(value)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise ModelError(
                f"layers_{self.name}: layer(s) {bad} are out of range for {self.info.name!r}, "
                f"which has {n} layers (valid: 0..{n - 1})")
        return layers

    @cached_property
    def used_layers(self) -> list[int]:
        """The layers that enter a compared pair (all of them unless ``pairs: depth``)."""
        return sorted({pair["ab".index(self.name)] for pair in self.up.pairs})

    @cached_property
    def identity(self) -> dict:
        """What identifies an outside model's weights and dtype (weights are not loaded)."""
        return model_identity(self.ref, self.store)

    @property
    def model_entry(self) -> Entry | None:
        """The trained family member's store entry (None for an outside model)."""
        return self.up.model_entries[self.ref.name] if self.family else None

    @property
    def model_key(self) -> str:
        """Identity of the weights and dtype (the family entry key, or a content hash; for a
        random init, a hash of the trained model's key and of the init seed)."""
        entry = self.model_entry
        key = entry.key if entry is not None else digest(self.identity)
        if not self.random_init:
            return key
        return digest({"init": "random", "of": key, "seed": self.init_seed})

    @property
    def init_seed(self) -> int:
        """Seed of a random init: a family member's own (the weights its training started
        from), else ``similarity.seed``."""
        return self.cfg.family.seed if self.family else self.cfg.similarity.seed

    def resolved_model_key(self) -> str | None:
        """``model_key`` when it is known without training or fetching anything."""
        resolved = "model_entries" in vars(self.up) if self.family else "identity" in vars(self)
        return self.model_key if resolved else None

    @property
    def model(self) -> LoadedModel:
        """The loaded model (shared with the other side when both use the same weights)."""
        key = self.model_key
        if key not in self.up.models:
            self.up.models[key] = self._load_model(key)
        return self.up.models[key]

    def _load_model(self, key: str) -> LoadedModel:
        entry = self.model_entry
        if self.random_init:
            return (random_family_model(entry, key) if entry is not None
                    else random_outside_model(self.ref, self.store, key, self.init_seed))
        return (load_family_model(entry) if entry is not None
                else load_outside_model(self.ref, self.store, key))

    # -- SAEs and codes -----------------------------------------------------------------
    @cached_property
    def sae_windows_key(self) -> str:
        """Identity of the packed training windows the side's SAEs are trained on."""
        return digest([self.up.corpus.key, tokenizer_sha(self.tokenizer_entry),
                               self.bos, "train-packed"])

    @cached_property
    def sae_entries(self) -> dict[int, Entry]:
        """SAEs trained here for every used layer (one activation pass serves all)."""
        if not self.trained_saes:
            raise ConfigError(f"sae_{self.name} is not trained here "
                              f"(source {self.sae_ref.source})")
        s = self.cfg.sae
        if self.sae_ref.seed_offset:
            s = replace(s, seed=s.seed + self.sae_ref.seed_offset)
        return train_saes(self.model_key, lambda: self.model, self.used_layers, s,
                          lambda: self.train_windows(s.train_tokens + SAE_WINDOW_MARGIN),
                          self.sae_windows_key, self.store, label=self.label)

    @cached_property
    def sae_keys(self) -> dict[int, str]:
        """Store key of every used layer's SAE (trained here: trains them first)."""
        if self.trained_saes:
            return {layer: e.key for layer, e in self.sae_entries.items()}
        return {layer: sae_key(self.sae_ref, layer, self.store) for layer in self.used_layers}

    def resolved_sae_keys(self) -> dict[int, str]:
        """The SAE keys known so far, without training or fetching anything."""
        mine = vars(self)
        if "sae_entries" in mine or "sae_keys" in mine:
            return self.sae_keys
        return {}

    def _load_sae(self, layer: int):
        if self.trained_saes:
            sae = load_sae(self.sae_entries[layer])
        else:
            sae = load_pretrained(self.sae_ref, layer, resolve_device(self.ref.device))
        check_compatible(sae, self.info, layer, f"sae_{self.name}")
        return sae

    def decoder(self, layer: int) -> np.ndarray:
        """Decoder rows of the layer's SAE, float64, shape (d_sae, d_model)."""
        return self.saes[layer].W_dec.detach().double().numpy()

    @cached_property
    def windows_side(self) -> str:
        """The side name in the store keys of what the side computes on its analysis windows
        (codes, SAE preflight): ``ab`` when both sides read the same windows (one tokenizer,
        the same BOS), so that a model's results serve every pair it takes part in (a
        ladder), on either side."""
        a, b = self.up.sides
        same = ((tokenizer_sha(a.tokenizer_entry), a.bos)
                == (tokenizer_sha(b.tokenizer_entry), b.bos))
        return "ab" if same else self.name

    @cached_property
    def codes(self) -> dict[int, Entry]:
        """SAE codes of every used layer on the analysis windows (layer -> entry)."""
        return self.extract(self.used_layers)

    def extract(self, layers: list[int]) -> dict[int, Entry]:
        """SAE codes of ``layers`` on the analysis windows (layer -> entry): read from the
        store, or made by one forward pass per shard for every ``extract.layers_per_pass``
        of them. A layer's entry holds the same bytes whichever layers share its pass."""
        e = self.cfg.extract
        return extract_codes(
            lambda: self.model, self.model_key,
            {layer: self.sae_keys[layer] for layer in layers},
            lambda layer: self.saes[layer], self.windows, self.up.windows_entry,
            self.windows_side,
            self.store, e.batch_size, e.shard_windows, e.layers_per_pass, label=self.label)

    @property
    def extract_blocks(self) -> list[tuple[int, ...]]:
        """The used layers in blocks of ``extract.layers_per_pass`` (0: one block): each
        block is one unit of extraction work (``saeuniv.tasks``)."""
        layers, step = self.used_layers, self.cfg.extract.layers_per_pass
        step = step or len(layers)
        return [tuple(layers[i:i + step]) for i in range(0, len(layers), step)]

    def _residual_rows(self, n_rows: int) -> dict[int, Entry]:
        return residuals.sample(lambda: self.model, self.model_key, self.used_layers,
                                self.windows, self.up.windows_entry, self.windows_side,
                                n_rows, self.store, self.cfg.extract.batch_size, self.label)

    def reconstruct(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The layer's SAE reconstruction of residual vectors ``x``, (n, d_model) float64."""
        sae = self.saes[layer]
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            return sae.decode(sae.encode(xt)).double().cpu().numpy()

    @cached_property
    def unembedding(self) -> np.ndarray | None:
        """The model's folded unembedding (``saeuniv.unembed``), float32, shape
        (d_model, V); None when it cannot be read (an untied head of a random init)."""

        def build(out) -> dict:
            w_u = unembedding(self.model, self.ref, self.store, self.random_init)
            if w_u is not None:
                np.save(out / "w_u.npy", w_u)
            return {"found": w_u is not None}

        entry, _ = self.store.get_or_create("unembed", {"model": self.model_key}, build)
        return np.load(entry.file("w_u.npy")) if entry.meta["found"] else None

    def depth(self, layer: int) -> float:
        """Relative depth of ``layer`` in the side's model."""
        return relative_depth(layer, self.info.n_layers)
