"""A sample of raw residual vectors per (model, layer): the first compared positions of the
analysis windows, for what needs activations and not codes (the stitch between two
models' residual spaces, the cross-reconstruction of one model's SAE on the other's
activations).

Row ``i`` of a sample is code row ``i`` of the same model and layer (the same text
position), so the samples of A and B line up row for row. One forward pass over the
windows that hold the first ``n_rows`` compared positions serves every layer asked for;
each layer's sample is a store entry (``residuals.npy``, float32, (n_rows, d_model)).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .extract import compared_activations
from .models import LoadedModel
from .store import Entry, Store
from .tokens import Windows

KIND = "residuals"
FILE = "residuals.npy"


def spec(model_key: str, layer: int, windows: Entry, side: str, n_rows: int) -> dict:
    return {"model": model_key, "layer": layer, "windows": windows.key, "side": side,
            "n_rows": n_rows}


def windows_needed(windows: Windows, n_rows: int) -> int:
    """How many leading windows hold the first ``n_rows`` compared positions."""
    have = np.cumsum(windows.mask.sum(1))
    if not len(have) or have[-1] < n_rows:
        total = int(have[-1]) if len(have) else 0
        raise ValueError(f"the analysis windows hold {total} compared positions, fewer than "
                         f"the {n_rows} residual rows asked for; lower match.stitch_rows or "
                         "raise extract.n_tokens")
    return int(np.searchsorted(have, n_rows) + 1)


@torch.no_grad()
def forward_rows(model: LoadedModel, windows: Windows, layers: list[int], n_rows: int,
                 batch_size: int, label: str) -> dict[int, np.ndarray]:
    """The residual vectors of the first ``n_rows`` compared positions at each layer,
    float32, shape (n_rows, d_model)."""
    n = windows_needed(windows, n_rows)
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    batches = compared_activations(model, windows, 0, n, batch_size, layers, label)
    for _, _, acts in tqdm(batches, desc=f"residuals {label}", unit="batch", mininterval=2,
                           total=-(-n // batch_size)):
        for layer in layers:
            parts[layer].append(acts[layer].cpu().numpy())
    return {layer: np.concatenate(parts[layer])[:n_rows] for layer in layers}


def sample(get_model: Callable[[], LoadedModel], model_key: str, layers: list[int],
           windows: Windows, windows_entry: Entry, side: str, n_rows: int, store: Store,
           batch_size: int, label: str) -> dict[int, Entry]:
    """The residual sample entry of every layer in ``layers``, built when missing (one
    forward pass for all the missing layers)."""
    specs = {layer: spec(model_key, layer, windows_entry, side, n_rows) for layer in layers}
    out = {layer: store.get(KIND, specs[layer]) for layer in layers}
    missing = [layer for layer in layers if out[layer] is None]
    if missing:
        rows = forward_rows(get_model(), windows, missing, n_rows, batch_size, label)
        for layer in missing:
            out[layer] = store.get_or_create(
                KIND, specs[layer], lambda d, x=rows[layer]: _write(d, x))[0]
    return out


def _write(folder, rows: np.ndarray) -> dict:
    np.save(folder / FILE, rows)
    return {"n_rows": int(rows.shape[0]), "d_model": int(rows.shape[1])}


def load(entry: Entry) -> np.ndarray:
    """The residual rows of a sample entry, float32, shape (n_rows, d_model)."""
    return np.load(entry.file(FILE))
