"""Extraction: residual-stream activations -> SAE codes, stored sparse per (model, layer).

One forward pass per batch serves every layer of a pass (all layers, or
``layers_per_pass`` of them to bound SAE memory); it stops after the deepest
layer needed. Only the windows' compared positions (``Windows.mask``: no pad,
no BOS, shared token boundaries) become code rows, so row ``i`` of every code
matrix of both models is the same text position. Codes are written shard by
shard (CSR float32, ``shard_windows`` windows each) into the store's partial
folder; a killed extraction resumes at the first missing shard, and a layer's
store entry is made when all its shards are there. A shard is written to a
temporary name, flushed and renamed, so a shard file is always whole; the
partial folder's ``layout.json`` records the shard size, and shards of another
layout are discarded. One process at a time extracts a layer (a lock per partial
folder): a concurrent run with the same inputs waits, then finds the entry made.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from . import faults
from .models import NONFINITE_FIX, LoadedModel, check_finite, set_threads
from .saes import STAT_KEYS, check_compatible, merge_quality, quality_stats
from .store import Entry, Store, atomic_file, atomic_write_text, locked
from .tokens import Windows

log = logging.getLogger(__name__)
LAYOUT = "layout.json"


def codes_spec(model_key: str, layer: int, sae_key: str, windows: Entry, side: str) -> dict:
    return {"model": model_key, "layer": layer, "sae": sae_key, "windows": windows.key,
            "side": side}


def _save_shard(path: Path, codes: sp.csr_matrix, stats: list[dict]) -> None:
    """Write one shard whole or not at all: a flushed temporary file, then a rename."""
    merged = {k: sum(s[k] for s in stats) for k in STAT_KEYS}
    with atomic_file(path, ".tmp.npz") as fh:
        np.savez(fh, data=codes.data, indices=codes.indices, indptr=codes.indptr,
                 shape=np.asarray(codes.shape), sum=np.sum([s["sum"] for s in stats], axis=0),
                 alive=np.any([s["alive"] for s in stats], axis=0),
                 **{k: np.asarray(v) for k, v in merged.items()})


def _load_shard(path: Path) -> tuple[sp.csr_matrix, dict]:
    with np.load(path) as z:
        codes = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        stats = {"sum": z["sum"], "alive": z["alive"], **{k: z[k].item() for k in STAT_KEYS}}
    return codes, stats


def _sparse(codes: torch.Tensor) -> sp.csr_matrix:
    rows, cols = torch.nonzero(codes, as_tuple=True)
    vals = codes[rows, cols].float().cpu().numpy()
    return sp.csr_matrix((vals, (rows.cpu().numpy(), cols.cpu().numpy())),
                         shape=tuple(codes.shape), dtype=np.float32)


def extract_codes(get_model: Callable[[], LoadedModel], model_key: str,
                  sae_keys: dict[int, str], get_sae: Callable[[int], object], windows: Windows,
                  windows_entry: Entry, side: str, store: Store, batch_size: int = 32,
                  shard_windows: int = 256, layers_per_pass: int = 0,
                  label: str = "") -> dict[int, Entry]:
    """SAE codes of one model at every layer in ``sae_keys`` (layer -> SAE key).

    Layers already in the store are returned without loading the model or the
    SAEs; shards already written by an interrupted run are reused. Returns
    layer -> codes entry.
    """
    specs = {l: codes_spec(model_key, l, k, windows_entry, side) for l, k in sae_keys.items()}
    out = {l: store.get("codes", spec) for l, spec in specs.items()}
    for entry in out.values():
        if entry is not None:
            _drop_leftover(store, entry.key)
    missing = [l for l, e in out.items() if e is None]
    if not missing:
        return out
    model = get_model()
    label = label or model.name
    saes = {l: get_sae(l) for l in missing}
    for layer, sae in saes.items():
        check_compatible(sae, model, layer, label)
    set_threads()
    n = len(windows.tokens)
    shard_starts = list(range(0, n, shard_windows))
    step = layers_per_pass or len(missing)
    keys = {l: store.key("codes", specs[l]) for l in missing}
    for g in range(0, len(missing), step):
        group = missing[g:g + step]
        with contextlib.ExitStack() as held:
            for l in sorted(group, key=keys.get):  # one order everywhere: no deadlock
                lock = store.partial_lock("codes", keys[l])
                lock.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(locked(lock, f"extracting {label} layer {l}"))
            for l in group:  # made by a concurrent run while this one waited
                out[l] = store.get("codes", specs[l])
            group = [l for l in group if out[l] is None]
            if not group:
                continue
            layout = {"shard_windows": shard_windows, "n_windows": n}
            partial = {l: _partial(store, specs[l], layout) for l in group}
            name = lambda s: f"shard-{s:05d}.npz"
            have = sum((partial[l] / name(s)).exists() for l in group
                       for s in range(len(shard_starts)))
            log.info("extract %s L%s: computing %d of %d shards (%d kept from an interrupted "
                     "run)", label, ",".join(map(str, group)),
                     len(group) * len(shard_starts) - have, len(group) * len(shard_starts), have)
            for l in group:
                saes[l].to(model.device)
            bar = tqdm(shard_starts, desc=f"extract {label} L{group[0]}..{group[-1]}",
                       unit="shard", mininterval=2)
            for s, start in enumerate(bar):
                todo = [l for l in group if not (partial[l] / name(s)).exists()]
                if todo:
                    _extract_shard(model, {l: saes[l] for l in todo}, windows, start,
                                   min(start + shard_windows, n), batch_size,
                                   {l: partial[l] / name(s) for l in todo}, label)
                    faults.point("shard")
            for l in group:
                out[l] = _finish(store, specs[l], partial[l], len(shard_starts),
                                 int(windows.mask.sum()))
                saes[l].to("cpu")
    return dict(sorted(out.items()))


def _drop_leftover(store: Store, key: str) -> None:
    """Remove the partial folder of a finished entry (a kill between the entry's rename and
    the clean-up leaves one), unless a process holds its lock."""
    path = store.root / "partial" / "codes" / key
    if not path.is_dir():
        return
    try:
        with FileLock(str(store.partial_lock("codes", key)), timeout=0):
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
    except (Timeout, OSError):
        pass


def _partial(store: Store, spec: dict, layout: dict) -> Path:
    """The layer's partial folder, holding only shards of ``layout`` (others are removed:
    a shard of another size covers other windows)."""
    path = store.partial_dir("codes", spec)
    try:
        same = json.loads((path / LAYOUT).read_text()) == layout
    except (OSError, ValueError):
        same = False
    if not same:
        for f in path.glob("shard-*.npz"):
            f.unlink()
        atomic_write_text(path / LAYOUT, json.dumps(layout))
    return path


@torch.no_grad()
def _extract_shard(model: LoadedModel, saes: dict[int, object], windows: Windows, lo: int,
                   hi: int, batch_size: int, dest: dict[int, Path], label: str) -> None:
    parts: dict[int, list[sp.csr_matrix]] = {l: [] for l in saes}
    stats: dict[int, list[dict]] = {l: [] for l in saes}
    layers = sorted(saes)
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        toks = torch.as_tensor(windows.tokens[start:stop], dtype=torch.long)
        keep = torch.as_tensor(windows.mask[start:stop]).to(model.device)
        res = model.residuals(toks, layers)
        for layer in layers:
            acts = res[layer][keep].float()
            where = f"model {label} layer {layer}, windows {start}..{stop - 1}"
            check_finite(acts, f"{where}: activations", NONFINITE_FIX)
            sae = saes[layer]
            codes = sae.encode(acts)
            check_finite(codes, f"{where}: SAE codes", "the SAE's weights hold NaN/inf or "
                         "overflow; check the SAE (and try dtype: float32)")
            stats[layer].append(quality_stats(acts, codes, sae.decode(codes)))
            parts[layer].append(_sparse(codes))
    for layer in layers:
        _save_shard(dest[layer], sp.vstack(parts[layer], format="csr"), stats[layer])


def _finish(store: Store, spec: dict, partial: Path, n_shards: int, n_rows: int) -> Entry:
    """Join the shards into the layer's store entry, then remove the partial folder (the
    caller holds its lock, so any temporary file left in it is a dead writer's)."""
    def build(path: Path) -> dict:
        shards, stats = [], []
        for s in range(n_shards):
            shard = partial / f"shard-{s:05d}.npz"
            try:
                codes, st = _load_shard(shard)
            except Exception as err:  # noqa: BLE001 - only a damaged disk gets here
                shard.unlink(missing_ok=True)
                raise ExtractionError(f"{shard} is unreadable ({type(err).__name__}: {err}); "
                                      "it was removed, run again to recompute it") from None
            shards.append(codes)
            stats.append(st)
        codes = sp.vstack(shards, format="csr")
        if codes.shape[0] != n_rows:
            raise ExtractionError(f"{partial}: the shards hold {codes.shape[0]} rows, expected "
                                  f"{n_rows}; remove the folder and run again")
        sp.save_npz(path / "codes.npz", codes, compressed=False)
        return {"n_tokens": codes.shape[0], "d_sae": codes.shape[1], "nnz": int(codes.nnz),
                "quality": asdict(merge_quality(stats)), "n_shards": n_shards}

    entry, _ = store.get_or_create("codes", spec, build)
    for f in partial.iterdir():
        f.unlink()
    partial.rmdir()
    return entry


def load_codes(entry: Entry) -> sp.csr_matrix:
    return sp.load_npz(entry.file("codes.npz")).tocsr()
