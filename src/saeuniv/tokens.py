"""Tokenizer training and fixed-length token windows.

The built-in family shares one byte-level BPE trained on the training split.
Windows start with BOS when the model reads one; the analysis windows end with
padding when a document runs out, and carry each token's character span in its
document so features can be labelled on text later. For two models the
analysis windows cover the same text, window by window, and mark the positions
compared (shared token boundaries when the tokenizers differ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TokenizerConfig
from .core.alignment import pair_segments
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


def tokenizer_sha(entry: Entry) -> str:
    """Content hash of a saved tokenizer (its ``tokenizer.json``)."""
    return entry.manifest["files"]["tokenizer.json"]["sha256"]


@dataclass(frozen=True)
class Windows:
    """Token windows of one model over one split: ids, compared positions and text spans."""

    tokens: np.ndarray      # (n, context) int32
    mask: np.ndarray        # (n, context) bool: compared positions (text, shared boundary)
    doc: np.ndarray         # (n,) int32 index into the split's documents
    offsets: np.ndarray     # (n, context, 2) int32 character span in the document; -1 for BOS/pad
    pad_id: int
    bos_id: int | None


def _special_ids(tokenizer, bos: bool) -> tuple[int, int | None]:
    if bos and tokenizer.bos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no BOS token but the model expects one")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad), (int(tokenizer.bos_token_id) if bos else None)


def _encode(tokenizer, docs: list[str]):
    enc = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def paired_windows(docs: list[str], sides: list[tuple], context: int,
                   n_tokens: int | None = None) -> list[Windows]:
    """Windows over the same text for one or two tokenizers, compared token for token.

    Parameters
    ----------
    docs : list of str
    sides : list of (tokenizer, bos)
        One or two tokenizers; ``bos`` says whether the model reads a BOS first.
    context : int
        Window length in tokens, BOS included.
    n_tokens : int, optional
        Stop once this many compared positions are collected.

    Returns
    -------
    windows : list of Windows, one per side
        Window ``i`` of every side covers the same characters of the same document;
        the masks select the same number of positions, in the same order, each
        ending at the same character offset (see ``alignment.pair_segments``).
        Pad, BOS and, for a model without BOS, the first position are never
        compared.
    """
    if not 1 <= len(sides) <= 2:
        raise ValueError(f"paired_windows takes one or two tokenizers, got {len(sides)}")
    same = len(sides) == 1 or sides[0] is sides[1] or (
        sides[0][0] is sides[1][0] and sides[0][1] == sides[1][1])
    specials = [_special_ids(tok, bos) for tok, bos in sides]
    bodies = [context - (1 if bos else 0) for _, bos in sides]
    rows: list[list] = [[] for _ in sides]
    doc_ids: list[int] = []
    collected = 0
    batch = 64
    for start in range(0, len(docs), batch):
        encoded = [_encode(tok, docs[start:start + batch]) for tok, _ in sides[:1 if same else 2]]
        for j in range(len(encoded[0][0])):
            per_side = [(np.asarray(ids, np.int64), np.asarray(spans, np.int64).reshape(-1, 2))
                        for ids, spans in ((e[0][j], e[1][j]) for e in encoded)]
            if same:
                per_side = per_side * len(sides)
            (ids_a, sp_a), (ids_b, sp_b) = per_side[0], per_side[-1]
            if len(ids_a) == 0 or len(ids_b) == 0:
                continue
            segs = pair_segments(sp_a, sp_b, bodies[0], bodies[-1],
                                 first_a=sides[0][1], first_b=sides[-1][1])
            for a0, a1, b0, b1, keep_a, keep_b in segs:
                if same:  # one tokenizer: every text position is compared
                    keep_a = keep_b = sp_a[a0:a1, 1] > sp_a[a0:a1, 0]
                    keep_a[0] &= bool(sides[0][1])
                pieces = ((ids_a, sp_a, a0, a1, keep_a), (ids_b, sp_b, b0, b1, keep_b))
                for k, (ids, spans, lo, hi, keep) in enumerate(pieces[:len(sides)]):
                    rows[k].append((ids[lo:hi], spans[lo:hi], keep))
                doc_ids.append(start + j)
                collected += int(keep_a.sum())
                if n_tokens is not None and collected >= n_tokens:
                    break
            if n_tokens is not None and collected >= n_tokens:
                break
        if n_tokens is not None and collected >= n_tokens:
            break
    if not doc_ids:
        raise ValueError("no token windows could be made: the documents are empty")
    out = []
    for (_tok, bos), (pad, bos_id), side_rows in zip(sides, specials, rows):
        n = len(side_rows)
        tokens = np.full((n, context), pad, np.int32)
        mask = np.zeros((n, context), bool)
        offsets = np.full((n, context, 2), -1, np.int32)
        shift = 1 if bos else 0
        if bos:
            tokens[:, 0] = bos_id
        for i, (ids, spans, keep) in enumerate(side_rows):
            tokens[i, shift:shift + len(ids)] = ids
            mask[i, shift:shift + len(ids)] = keep
            offsets[i, shift:shift + len(ids)] = spans
        out.append(Windows(tokens, mask, np.asarray(doc_ids, np.int32), offsets, pad, bos_id))
    return out


def make_windows(docs: list[str], tokenizer, context: int, n_tokens: int | None = None,
                 pack: bool = False, bos: bool = True) -> Windows:
    """Cut documents into windows of ``context`` tokens, starting with BOS when ``bos``.

    With ``pack=False`` every window holds text from one document, padded at the
    end (see ``paired_windows``); with ``pack=True`` documents are joined with EOS
    and no padding is used (for training). ``n_tokens`` stops once that many text
    tokens are collected.
    """
    if not pack:
        return paired_windows(docs, [(tokenizer, bos)], context, n_tokens)[0]
    pad, bos_id = _special_ids(tokenizer, bos)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
    body = context - (1 if bos else 0)
    stream_ids, stream_offs, stream_doc = [], [], []
    for start in range(0, len(docs), 256):
        ids_list, spans_list = _encode(tokenizer, docs[start:start + 256])
        for j, (ids, spans) in enumerate(zip(ids_list, spans_list)):
            stream_ids += list(ids) + [eos]
            stream_offs += [tuple(s) for s in spans] + [(-1, -1)]
            stream_doc += [start + j] * (len(ids) + 1)
        if n_tokens is not None and len(stream_ids) >= n_tokens * context / body:
            break
    n_rows = len(stream_ids) // body
    if n_tokens is not None:
        n_rows = min(n_rows, -(-n_tokens // body))
    if n_rows == 0:
        raise ValueError("no token windows could be made: the documents are empty")
    ids = np.asarray(stream_ids[:n_rows * body], np.int32).reshape(n_rows, body)
    offs = np.asarray(stream_offs[:n_rows * body], np.int32).reshape(n_rows, body, 2)
    doc = np.asarray(stream_doc[:n_rows * body:body], np.int32)
    if bos:
        ids = np.concatenate([np.full((n_rows, 1), bos_id, np.int32), ids], axis=1)
        offs = np.concatenate([np.full((n_rows, 1, 2), -1, np.int32), offs], axis=1)
    mask = offs[:, :, 1] > offs[:, :, 0]
    mask[:, 0] = False
    return Windows(ids, mask, doc, offs, pad, bos_id)


def analysis_windows(corpus: Entry, tokenizers: list[tuple[Entry, bool]], context: int,
                     n_tokens: int, store: Store) -> Entry:
    """Analysis windows for the two models, exactly the token budget's documents, cached.

    ``tokenizers`` holds ``(tokenizer entry, bos)`` for model A and model B.
    Raises ValueError when the analysis split holds fewer compared tokens than
    ``n_tokens``.
    """
    sides = [[tokenizer_sha(e), bool(bos)] for e, bos in tokenizers]
    spec = {"corpus": corpus.key, "sides": sides, "context": context, "n_tokens": n_tokens}

    def build(out: Path) -> dict:
        pairs = [(load_tokenizer(e), bos) for e, bos in tokenizers[:1 if sides[0] == sides[1]
                                                                   else 2]]
        pairs = pairs * (3 - len(pairs))  # one tokenizer: the same (tokenizer, bos) for both
        wins = paired_windows([d["text"] for d in read_split(corpus, "analysis")], pairs,
                              context, n_tokens)
        n_valid = int(wins[0].mask.sum())
        if n_valid < n_tokens:
            raise ValueError(
                f"the analysis split has only {n_valid} tokens but extract.n_tokens={n_tokens}; "
                "lower extract.n_tokens or raise corpus.analysis_fraction / use a larger corpus")
        np.save(out / "doc.npy", wins[0].doc)
        special = []
        for side, win in zip("ab", wins):
            np.save(out / f"tokens_{side}.npy", win.tokens)
            np.save(out / f"mask_{side}.npy", win.mask)
            np.save(out / f"offsets_{side}.npy", win.offsets)
            special.append({"pad_id": win.pad_id, "bos_id": win.bos_id})
        (out / "special.json").write_text(json.dumps(special))
        return {"n_windows": int(len(wins[0].tokens)), "n_valid_tokens": n_valid,
                "shared_tokenizer": sides[0][0] == sides[1][0],
                "n_text_tokens": [int((w.offsets[:, :, 1] > w.offsets[:, :, 0]).sum())
                                  for w in wins]}

    entry, _ = store.get_or_create("windows", spec, build)
    return entry


def load_windows(entry: Entry, side: str) -> Windows:
    """The windows of model ``side`` (``a`` or ``b``) from an ``analysis_windows`` entry."""
    special = json.loads(entry.file("special.json").read_text())["ab".index(side)]
    return Windows(np.load(entry.file(f"tokens_{side}.npy")),
                   np.load(entry.file(f"mask_{side}.npy")), np.load(entry.file("doc.npy")),
                   np.load(entry.file(f"offsets_{side}.npy")), special["pad_id"],
                   special["bos_id"])
