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
Where the partial folder and its lock are is the store's business; the names of
the files in it (``shard-<i>.npz``, ``layout.json``) are this module's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import faults
from .files import atomic_file, atomic_write_text
from .models import NONFINITE_FIX, LoadedModel, check_finite, set_threads
from .saes import STAT_KEYS, check_compatible, merge_quality, quality_stats
from .store import SHARD_PREFIX, Entry, Store
from .tokens import Windows

log = logging.getLogger(__name__)
KIND = "codes"  # the store kind of a layer's codes
LAYOUT = "layout.json"  # in the partial folder: the shard size its shards were made with


class ExtractionError(ValueError):
    """The shards kept in a layer's partial folder cannot be joined into its codes entry:
    a shard file is unreadable (a damaged disk: it is removed, so a rerun recomputes it)
    or the shards hold another number of rows than the windows have compared positions
    (the message says to remove the folder). A ValueError: the command line prints the
    message on one line and exits with status 2."""


def shard_name(index: int) -> str:
    """The file name of shard ``index`` of a layer in its partial folder."""
    return f"{SHARD_PREFIX}{index:05d}.npz"


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
                  sae_keys: dict[int, str], get_sae: Callable[[int], object],
                  windows: Windows, windows_entry: Entry, side: str, store: Store,
                  batch_size: int = 32, shard_windows: int = 256, layers_per_pass: int = 0,
                  label: str = "") -> dict[int, Entry]:
    """SAE codes of one model at every layer in ``sae_keys`` (layer -> SAE key).

    Layers already in the store are returned without loading the model or the
    SAEs; shards already written by an interrupted run are reused. Returns
    layer -> codes entry. ExtractionError when kept shards cannot be joined.
    """
    specs = {layer: codes_spec(model_key, layer, k, windows_entry, side)
             for layer, k in sae_keys.items()}
    out = {layer: store.get(KIND, spec) for layer, spec in specs.items()}
    for entry in out.values():
        if entry is not None:  # a kill after the entry's rename may leave its shards
            store.drop_partial(KIND, entry.key)
    missing = [layer for layer, e in out.items() if e is None]
    if not missing:
        return out
    model = get_model()
    label = label or model.name
    saes = {layer: get_sae(layer) for layer in missing}
    for layer, sae in saes.items():
        check_compatible(sae, model, layer, label)
    set_threads()
    step = layers_per_pass or len(missing)
    for g in range(0, len(missing), step):
        group = {layer: saes[layer] for layer in missing[g:g + step]}
        out.update(_extract_pass(model, group, specs, windows, store, batch_size,
                                 shard_windows, label))
    return dict(sorted(out.items()))


def _extract_pass(model: LoadedModel, saes: dict[int, object], specs: dict[int, dict],
                  windows: Windows, store: Store, batch_size: int, shard_windows: int,
                  label: str) -> dict[int, Entry]:
    """The codes entries of the layers of ``saes``, from one forward pass per shard,
    holding every layer's partial folder lock (a concurrent run with the same inputs
    waits, then finds the entries made)."""
    keys = {layer: store.key(KIND, specs[layer]) for layer in saes}
    out = {}
    with contextlib.ExitStack() as held:
        for layer in sorted(saes, key=keys.get):  # one order everywhere: no deadlock
            held.enter_context(store.lock_partial(KIND, keys[layer],
                                                  f"extracting {label} layer {layer}"))
        for layer in saes:  # made by a concurrent run while this one waited
            out[layer] = store.get(KIND, specs[layer])
        group = [layer for layer in saes if out[layer] is None]
        if not group:
            return out
        n = len(windows.tokens)
        layout = {"shard_windows": shard_windows, "n_windows": n}
        partial = {layer: _partial(store, specs[layer], layout) for layer in group}
        n_shards = _write_shards(model, {layer: saes[layer] for layer in group}, windows,
                                 partial, batch_size, shard_windows, label)
        for layer in group:
            out[layer] = _finish(store, specs[layer], partial[layer], n_shards,
                                 int(windows.mask.sum()))
            saes[layer].to("cpu")
    return out


def _write_shards(model: LoadedModel, saes: dict[int, object], windows: Windows,
                  partial: dict[int, Path], batch_size: int, shard_windows: int,
                  label: str) -> int:
    """Write every shard missing from the layers' partial folders; returns the number of
    shards per layer."""
    n = len(windows.tokens)
    shard_starts = list(range(0, n, shard_windows))
    group = list(saes)
    have = sum((partial[layer] / shard_name(s)).exists() for layer in group
               for s in range(len(shard_starts)))
    log.info("extract %s L%s: computing %d of %d shards (%d kept from an interrupted "
             "run)", label, ",".join(map(str, group)),
             len(group) * len(shard_starts) - have, len(group) * len(shard_starts), have)
    for layer in group:
        saes[layer].to(model.device)
    bar = tqdm(shard_starts, desc=f"extract {label} L{group[0]}..{group[-1]}",
               unit="shard", mininterval=2)
    for s, start in enumerate(bar):
        todo = [layer for layer in group if not (partial[layer] / shard_name(s)).exists()]
        if todo:
            extract_shard(model, {layer: saes[layer] for layer in todo}, windows, start,
                           min(start + shard_windows, n), batch_size,
                           {layer: partial[layer] / shard_name(s) for layer in todo}, label)
            faults.point("shard")
    return len(shard_starts)


def _partial(store: Store, spec: dict, layout: dict) -> Path:
    """The layer's partial folder, holding only shards of ``layout`` (others are removed:
    a shard of another size covers other windows)."""
    path = store.partial_dir(KIND, spec)
    try:
        same = json.loads((path / LAYOUT).read_text()) == layout
    except (OSError, ValueError):
        same = False
    if not same:
        for f in path.glob(f"{SHARD_PREFIX}*.npz"):
            f.unlink()
        atomic_write_text(path / LAYOUT, json.dumps(layout))
    return path


@torch.no_grad()
def compared_activations(model: LoadedModel, windows: Windows, lo: int, hi: int,
                         batch_size: int, layers: list[int], label: str):
    """Yield ``(start, stop, {layer: activations})`` for windows ``lo:hi`` in batches: the
    residual vectors of each batch's compared positions, float32, shape (rows, d_model),
    checked finite."""
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        toks = torch.as_tensor(windows.tokens[start:stop], dtype=torch.long)
        keep = torch.as_tensor(windows.mask[start:stop]).to(model.device)
        res = model.residuals(toks, layers)
        out = {}
        for layer in layers:
            out[layer] = res[layer][keep].float()
            check_finite(out[layer], f"model {label} layer {layer}, windows {start}..{stop - 1}"
                         ": activations", NONFINITE_FIX)
        yield start, stop, out


@torch.no_grad()
def extract_shard(model: LoadedModel, saes: dict[int, object], windows: Windows, lo: int,
                  hi: int, batch_size: int, dest: dict[int, Path], label: str) -> None:
    """Encode windows ``lo:hi`` with the SAE of every layer of ``saes`` and write each
    layer's codes (CSR) and quality statistics to its shard file ``dest[layer]``."""
    parts: dict[int, list[sp.csr_matrix]] = {layer: [] for layer in saes}
    stats: dict[int, list[dict]] = {layer: [] for layer in saes}
    layers = sorted(saes)
    for start, stop, res in compared_activations(model, windows, lo, hi, batch_size, layers,
                                                 label):
        for layer in layers:
            acts = res[layer]
            where = f"model {label} layer {layer}, windows {start}..{stop - 1}"
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
            shard = partial / shard_name(s)
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

    entry, _ = store.get_or_create(KIND, spec, build)
    store.clear_partial(KIND, entry.key)
    return entry


def load_codes(entry: Entry) -> sp.csr_matrix:
    return sp.load_npz(entry.file("codes.npz")).tocsr()
