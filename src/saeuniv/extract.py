"""Extraction: residual-stream activations -> SAE codes, stored sparse per (model, layer).

One forward pass per batch serves every layer of a model: transformer-lens
``run_with_cache`` with a ``names_filter`` on ``blocks.L.hook_resid_post`` and
``stop_at_layer`` just past the deepest layer needed. Pad and BOS positions are
dropped with the windows' mask, so row ``i`` of every code matrix of every model
is the same token. Codes are CSR float32 (``codes.npz``) in the store, keyed by
model, layer, SAE and windows.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .models import LoadedModel, set_threads
from .saes import Quality, check_compatible
from .store import Entry, Store
from .tokens import Windows


class ExtractionError(ValueError):
    """Activations or codes are unusable (NaN/inf, empty)."""


class _QualityAccumulator:
    """Streams L0, FVU and dead-feature statistics over token batches (float64)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sum = np.zeros(d_in)
        self.sumsq = 0.0
        self.resid = 0.0
        self.active = 0
        self.alive = np.zeros(d_sae, dtype=bool)

    def update(self, acts: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor) -> None:
        a = acts.double()
        self.n += a.shape[0]
        self.sum += a.sum(0).numpy()
        self.sumsq += float((a ** 2).sum())
        self.resid += float(((a - recon.double()) ** 2).sum())
        nz = codes > 0
        self.active += int(nz.sum())
        self.alive |= nz.any(0).numpy()

    def result(self) -> Quality:
        total = self.sumsq - float((self.sum ** 2).sum()) / max(self.n, 1)
        return Quality(l0=self.active / max(self.n, 1), fvu=self.resid / max(total, 1e-30),
                       dead_fraction=float(1 - self.alive.mean()), n_tokens=self.n)


def codes_spec(model: LoadedModel, layer: int, sae_entry: Entry, windows: Entry) -> dict:
    return {"model": model.entry.key, "layer": layer, "sae": sae_entry.key,
            "windows": windows.key}


def extract_codes(model: LoadedModel, saes: dict[int, tuple[Entry, object]], windows: Windows,
                  windows_entry: Entry, store: Store, batch_size: int = 32,
                  label: str = "") -> dict[int, Entry]:
    """SAE codes of ``model`` at every layer in ``saes`` (layer -> (entry, sae)).

    Layers already in the store are not recomputed; the missing ones share one
    forward pass per batch. Returns layer -> codes entry.
    """
    out = {}
    missing = []
    for layer, (sae_entry, sae) in saes.items():
        check_compatible(sae, model, layer, label or model.name)
        entry = store.get("codes", codes_spec(model, layer, sae_entry, windows_entry))
        if entry is None:
            missing.append(layer)
        else:
            out[layer] = entry
    if not missing:
        return out
    set_threads()
    mask = windows.mask()
    hooks = {model.hook(l): l for l in missing}
    parts: dict[int, list[sp.csr_matrix]] = {l: [] for l in missing}
    stats = {l: _QualityAccumulator(model.d_model, saes[l][1].cfg.d_sae) for l in missing}
    n = len(windows.tokens)
    bar = tqdm(range(0, n, batch_size), desc=f"extract {label or model.name}", unit="batch",
               mininterval=2)
    with torch.no_grad():
        for start in bar:
            toks = torch.as_tensor(windows.tokens[start:start + batch_size], dtype=torch.long)
            keep = torch.as_tensor(mask[start:start + batch_size])
            _, cache = model.model.run_with_cache(
                toks, names_filter=lambda name: name in hooks, stop_at_layer=max(missing) + 1)
            for hook, layer in hooks.items():
                acts = cache[hook][keep].float()
                if not torch.isfinite(acts).all():
                    bad = int((~torch.isfinite(acts)).any(1).sum())
                    raise ExtractionError(
                        f"{label or model.name} layer {layer}: {bad} token(s) have NaN/inf "
                        f"activations (windows {start}..{start + len(toks) - 1}); check the model "
                        "weights and dtype (try float32)")
                sae = saes[layer][1]
                codes = sae.encode(acts)
                stats[layer].update(acts, codes, sae.decode(codes))
                parts[layer].append(sp.csr_matrix(codes.numpy().astype(np.float32)))
    for layer in missing:
        codes = sp.vstack(parts[layer], format="csr")
        q = stats[layer].result()

        def build(path: Path, codes=codes, q=q) -> dict:
            sp.save_npz(path / "codes.npz", codes, compressed=False)
            return {"n_tokens": codes.shape[0], "d_sae": codes.shape[1], "nnz": int(codes.nnz),
                    "quality": asdict(q)}

        out[layer], _ = store.get_or_create(
            "codes", codes_spec(model, layer, saes[layer][0], windows_entry), build)
    return dict(sorted(out.items()))


def load_codes(entry: Entry) -> sp.csr_matrix:
    return sp.load_npz(entry.file("codes.npz")).tocsr()
