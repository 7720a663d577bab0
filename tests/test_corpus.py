"""Corpus reading, chunking and the train/analysis split."""

import json

import pytest

from saeuniv.config import CorpusConfig
from saeuniv.corpus import CorpusError, chunk_document, prepare_corpus, read_split
from saeuniv.store import Store


def test_chunks_respect_the_limit_and_keep_text():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * (i * 40) for i in range(12))
    pieces = chunk_document(text, 400)
    assert all(len(p) <= 400 for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")


def test_split_is_disjoint_and_seeded(tmp_path, corpus_dir):
    store = Store(tmp_path)
    cfg = CorpusConfig(source=str(corpus_dir), analysis_fraction=0.25, max_doc_chars=500)
    entry = prepare_corpus(cfg, store)
    train, analysis = read_split(entry, "train"), read_split(entry, "analysis")
    def src(docs):
        return {d["id"].split("-")[0] for d in docs}
    assert src(train).isdisjoint(src(analysis))
    assert len(src(analysis)) == 30 and len(src(train)) == 90
    again = prepare_corpus(CorpusConfig(source=str(corpus_dir), analysis_fraction=0.25,
                                        max_doc_chars=500, seed=1), store)
    assert src(read_split(again, "analysis")) != src(analysis)


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(5)))
    entry = prepare_corpus(CorpusConfig(source=str(path)), Store(tmp_path / "s"))
    assert entry.meta["train_sources"] + entry.meta["analysis_sources"] == 5


@pytest.mark.parametrize("content, message", [
    (b"abc\x00\x01\x02", r"bad.txt is binary, not text \(NUL byte at offset 3\)"),
    (b"text " * 20000 + b"\x00", r"bad.txt is binary, not text \(NUL byte at offset 100000\)"),
    (b"caf\xe9 au lait", r"bad.txt is not valid UTF-8 \(byte 0xe9 at offset 3: .*re-encode it"),
])
def test_bad_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(CorpusConfig(source=str(path)), Store(tmp_path / "s"))
    assert not (tmp_path / "s" / "corpus").exists()


def test_a_source_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("word " * (100 * (i + 1)))
    monkeypatch.setenv("SAEUNIV_MAX_CORPUS_BYTES", "2000")
    read = []
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(CorpusError, match=r"holds 3,000 bytes in 3 file\(s\) \(largest: .*2.txt, "
                       r"1,500 bytes\), over the 2,000-byte limit.*SAEUNIV_MAX_CORPUS_BYTES="):
        prepare_corpus(CorpusConfig(source=str(folder)), Store(tmp_path / "s"))
    assert read == []
    monkeypatch.undo()
    monkeypatch.setenv("SAEUNIV_MAX_CORPUS_BYTES", "3000")  # raised: accepted
    entry = prepare_corpus(CorpusConfig(source=str(folder)), Store(tmp_path / "s"))
    assert entry.meta["train_sources"] + entry.meta["analysis_sources"] == 3


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2 has no string field 'text'"):
        prepare_corpus(CorpusConfig(source=str(path)), Store(tmp_path / "s"))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CorpusError, match="is not a file, a folder"):
        prepare_corpus(CorpusConfig(source=str(tmp_path / "nope.txt")), Store(tmp_path / "s"))
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(CorpusError, match="at least 2 are needed"):
        prepare_corpus(CorpusConfig(source=str(tmp_path / "one.txt")), Store(tmp_path / "s"))
    with pytest.raises(CorpusError, match="unknown stdlib corpus part"):
        prepare_corpus(CorpusConfig(source="stdlib-bible"), Store(tmp_path / "s"))
