"""Extraction's store work with a stand-in model and SAEs (no model download, no training):
a damaged shard, shards of the wrong size, and the clean-up of a finished entry's pieces.

The stand-ins give the same activations and codes on every call, so an extraction that
resumes from shards must give the codes of one that never stopped, bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from filelock import FileLock

from saeuniv.doctor import check_store
from saeuniv.extract import ExtractionError, codes_spec, extract_codes, load_codes
from saeuniv.store import Store

D_MODEL, D_SAE, VOCAB = 8, 16, 50
N_WINDOWS, CONTEXT = 10, 5
SHARD_WINDOWS, BATCH = 3, 2  # 4 shards (3, 3, 3, 1 windows) of 2, 2, 2, 1 batches
LAYERS = (0, 1)
WINDOWS_ENTRY = SimpleNamespace(key="w" * 64)  # extract reads only the key of it


class ToyModel:
    """Residuals that depend on the tokens and the layer only; ``fail_at``: the number of
    the forward pass that raises (a kill in the middle of an extraction)."""

    name, device, d_model = "toy", "cpu", D_MODEL

    def __init__(self, fail_at: int | None = None):
        self.emb = torch.randn(VOCAB, D_MODEL, generator=torch.Generator().manual_seed(0))
        self.fail_at, self.calls = fail_at, 0

    def residuals(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        x = self.emb[tokens]
        return {layer: x * (layer + 1) + layer for layer in layers}


class ToySAE:
    """A ReLU encoder with fixed random weights per layer."""

    def __init__(self, layer: int):
        gen = torch.Generator().manual_seed(100 + layer)
        self.w = torch.randn(D_MODEL, D_SAE, generator=gen)
        self.cfg = SimpleNamespace(d_in=D_MODEL)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w - 1.0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.w.T

    def to(self, device):
        return self


def _windows(drop_first: bool = False) -> SimpleNamespace:
    """Token windows with a few positions not compared (``drop_first``: none of window 0)."""
    rng = np.random.default_rng(0)
    mask = rng.random((N_WINDOWS, CONTEXT)) > 0.2
    mask[:, 0] = False  # as if BOS
    if drop_first:
        mask[0] = False
    return SimpleNamespace(tokens=rng.integers(0, VOCAB, (N_WINDOWS, CONTEXT), dtype=np.int32),
                           mask=mask)


def _extract(store: Store, model: ToyModel | None = None, windows=None, get_model=None):
    model = model or ToyModel()
    return extract_codes(get_model or (lambda: model), "toy-model",
                         {layer: f"sae-{layer}" for layer in LAYERS}, ToySAE,
                         windows or _windows(), WINDOWS_ENTRY, "a", store, batch_size=BATCH,
                         shard_windows=SHARD_WINDOWS)


def _key(store: Store, layer: int) -> str:
    return store.key("codes", codes_spec("toy-model", layer, f"sae-{layer}", WINDOWS_ENTRY,
                                         "a"))


def _interrupted(store: Store, windows=None) -> None:
    """An extraction killed in the second shard: the first shard of each layer is kept."""
    with pytest.raises(RuntimeError, match="killed"):
        _extract(store, ToyModel(fail_at=3), windows)  # passes 1-2: shard 0, 3: shard 1
    for layer in LAYERS:
        assert sorted(p.name for p in store.partial_path("codes", _key(store, layer))
                      .iterdir()) == ["layout.json", "shard-00000.npz"]


def _same_codes(a, b) -> None:
    for layer in LAYERS:
        ca, cb = load_codes(a[layer]), load_codes(b[layer])
        assert ca.dtype == cb.dtype and ca.shape == cb.shape and (ca != cb).nnz == 0, layer
        assert a[layer].meta == b[layer].meta, layer


def test_an_unreadable_shard_is_named_removed_and_recomputed_by_a_rerun(tmp_path):
    reference = _extract(Store(tmp_path / "reference"))
    store = Store(tmp_path / "store")
    _interrupted(store)
    found, _ = check_store(store.root, older_than=86400, fix=False)  # the doctor agrees
    assert sorted(f.detail.split(" of ")[0] for f in found) == ["1 shard(s)"] * 2
    shard = store.partial_path("codes", _key(store, 0)) / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged disk: not a zip file any more
    with pytest.raises(ExtractionError) as err:
        _extract(store)
    assert isinstance(err.value, ValueError)  # the command line: one line, exit status 2
    message = str(err.value)
    assert message.startswith(f"{shard} is unreadable (") and "\n" not in message
    assert message.endswith("; it was removed, run again to recompute it")
    assert not shard.exists()
    assert store.get("codes", codes_spec("toy-model", 0, "sae-0", WINDOWS_ENTRY, "a")) is None
    rerun = ToyModel()
    again = _extract(store, rerun)
    assert rerun.calls == 2  # the removed shard only (2 batches), for layer 0 only
    _same_codes(again, reference)
    assert not any(store.partial_path("codes", _key(store, layer)).exists() for layer in LAYERS)


def test_shards_of_other_rows_are_refused_with_the_counts(tmp_path):
    """Shards kept from windows whose compared positions differ (the same key: a changed
    or damaged windows entry) do not add up: the message gives both counts."""
    store = Store(tmp_path)
    before, after = _windows(), _windows(drop_first=True)
    _interrupted(store, before)
    with pytest.raises(ExtractionError) as err:
        _extract(store, windows=after)
    partial = store.partial_path("codes", _key(store, 0))
    held = int(before.mask[:SHARD_WINDOWS].sum() + after.mask[SHARD_WINDOWS:].sum())
    assert held != int(after.mask.sum())
    assert str(err.value) == (f"{partial}: the shards hold {held} rows, expected "
                              f"{int(after.mask.sum())}; remove the folder and run again")
    assert (partial / "shard-00000.npz").exists()  # kept: the message says what to do


def test_a_finished_entrys_leftover_pieces_are_removed_unless_locked(tmp_path):
    """A kill between a codes entry's rename and the clean-up of its partial folder leaves
    pieces; the next extraction removes them without loading the model, except where a
    process holds the folder's lock."""
    store = Store(tmp_path)
    first = _extract(store)
    for layer in LAYERS:
        spec = codes_spec("toy-model", layer, f"sae-{layer}", WINDOWS_ENTRY, "a")
        (store.partial_dir("codes", spec) / "shard-00000.npz").write_bytes(b"x")
    lock = store.partial_lock("codes", _key(store, 1))

    def no_model():
        raise AssertionError("the model is loaded for finished entries")
    with FileLock(str(lock)):
        again = _extract(store, get_model=no_model)
    assert {k: e.key for k, e in again.items()} == {k: e.key for k, e in first.items()}
    assert not store.partial_path("codes", _key(store, 0)).exists()
    assert (store.partial_path("codes", _key(store, 1)) / "shard-00000.npz").exists()
    _extract(store, get_model=no_model)  # the lock is free now
    assert not store.partial_path("codes", _key(store, 1)).exists()
