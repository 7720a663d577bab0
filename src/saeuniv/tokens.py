"""Tokenizer training and fixed-length token windows.

The built-in family shares one byte-level BPE trained on the training split.
Windows start with BOS; the analysis windows end with padding when a document
runs out, and carry each token's character span in its document so features
can be labelled on text later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .alignment import valid_positions
from .config import TokenizerConfig
from .corpus import read_split
from .store import Entry, Store

BOS, PAD, EOS = "<|bos|>", "<|pad|>", "<|endoftext|>"


def train_tokenizer(corpus: Entry, cfg: TokenizerConfig, store: Store) -> Entry:
    """A byte-level BPE trained on the corpus' training split, saved in HF format."""
    spec = {"corpus": corpus.key, "vocab_size": cfg.vocab_size, "specials": [BOS, PAD, EOS]}

    def build(out: Path) -> dict:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, special_tokens=[BOS, PAD, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts = [d["text"] for d in read_split(corpus, "train")]
        tok.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=BOS, pad_token=PAD, eos_token=EOS)
        fast.save_pretrained(str(out))
        return {"vocab_size": fast.vocab_size}

    entry, _ = store.get_or_create("tokenizer", spec, build)
    return entry


def load_tokenizer(entry: Entry):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(entry.path))


@dataclass(frozen=True)
class Windows:
    """Token windows of one split: ids, source document and character spans."""

    tokens: np.ndarray      # (n, context) int32
    doc: np.ndarray         # (n,) int32 index into the split's documents
    offsets: np.ndarray     # (n, context, 2) int32 character span in the document; -1 for BOS/pad
    pad_id: int
    bos_id: int

    def mask(self) -> np.ndarray:
        return valid_positions(self.tokens, self.pad_id, self.bos_id)


def make_windows(docs: list[str], tokenizer, context: int, n_tokens: int | None = None,
                 pack: bool = False) -> Windows:
    """Cut documents into windows of ``context`` tokens, each starting with BOS.

    With ``pack=False`` every window holds text from one document, padded at the
    end; with ``pack=True`` documents are joined with EOS and no padding is used
    (for training). ``n_tokens`` stops once that many text tokens are collected.
    """
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    body = context - 1
    rows, doc_ids, offs = [], [], []
    stream_ids, stream_offs, stream_doc = [], [], []
    collected = 0
    batch = 256
    for start in range(0, len(docs), batch):
        enc = tokenizer(docs[start:start + batch], add_special_tokens=False,
                        return_offsets_mapping=True)
        for j, (ids, spans) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            d = start + j
            if pack:
                stream_ids += list(ids) + [eos]
                stream_offs += list(spans) + [(-1, -1)]
                stream_doc += [d] * (len(ids) + 1)
                continue
            for s in range(0, len(ids), body):
                piece = ids[s:s + body]
                row = [bos] + list(piece) + [pad] * (body - len(piece))
                off = [(-1, -1)] + list(spans[s:s + body]) + [(-1, -1)] * (body - len(piece))
                rows.append(row)
                offs.append(off)
                doc_ids.append(d)
                collected += len(piece)
                if n_tokens is not None and collected >= n_tokens:
                    return _windows(rows, doc_ids, offs, pad, bos)
        if pack and n_tokens is not None and len(stream_ids) >= n_tokens * context / body:
            break
    if pack:
        n_rows = len(stream_ids) // body
        if n_tokens is not None:
            n_rows = min(n_rows, -(-n_tokens // body))
        for s in range(0, n_rows * body, body):
            rows.append([bos] + stream_ids[s:s + body])
            offs.append([(-1, -1)] + stream_offs[s:s + body])
            doc_ids.append(stream_doc[s])
    return _windows(rows, doc_ids, offs, pad, bos)


def _windows(rows, doc_ids, offs, pad, bos) -> Windows:
    if not rows:
        raise ValueError("no token windows could be made: the documents are empty")
    return Windows(np.asarray(rows, np.int32), np.asarray(doc_ids, np.int32),
                   np.asarray(offs, np.int32).reshape(len(rows), -1, 2), pad, bos)


def analysis_windows(corpus: Entry, tokenizer_entry: Entry, context: int, n_tokens: int,
                     store: Store) -> Entry:
    """Analysis windows with exactly the token budget's documents, cached in the store.

    Raises ValueError when the analysis split holds fewer text tokens than ``n_tokens``.
    """
    spec = {"corpus": corpus.key, "tokenizer": tokenizer_entry.key, "context": context,
            "n_tokens": n_tokens}

    def build(out: Path) -> dict:
        tok = load_tokenizer(tokenizer_entry)
        win = make_windows([d["text"] for d in read_split(corpus, "analysis")], tok, context,
                           n_tokens)
        n_valid = int(win.mask().sum())
        if n_valid < n_tokens:
            raise ValueError(
                f"the analysis split has only {n_valid} tokens but extract.n_tokens={n_tokens}; "
                "lower extract.n_tokens or raise corpus.analysis_fraction / use a larger corpus")
        np.save(out / "tokens.npy", win.tokens)
        np.save(out / "doc.npy", win.doc)
        np.save(out / "offsets.npy", win.offsets)
        (out / "special.json").write_text(json.dumps({"pad_id": win.pad_id, "bos_id": win.bos_id}))
        return {"n_windows": int(len(win.tokens)), "n_valid_tokens": n_valid}

    entry, _ = store.get_or_create("windows", spec, build)
    return entry


def load_windows(entry: Entry) -> Windows:
    special = json.loads(entry.file("special.json").read_text())
    return Windows(np.load(entry.file("tokens.npy")), np.load(entry.file("doc.npy")),
                   np.load(entry.file("offsets.npy")), special["pad_id"], special["bos_id"])
