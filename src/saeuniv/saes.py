"""SAEs: train one per (model, layer) with sae-lens, load pretrained ones, check and measure them.

Three sources, one interface (``(key, sae)`` per layer):

* ``train``: trained here with sae-lens's ``SAETrainer`` on residual-stream
  activations collected in one forward pass per batch for all the side's
  layers (wandb off), cached in the store in sae-lens's folder format
  (``cfg.json`` + ``sae_weights.safetensors``);
* ``release``: ``SAE.from_pretrained(release, id)`` (sae-lens 6 returns the SAE alone);
* ``folder``: ``SAE.load_from_disk`` on a local sae-lens folder.

Every SAE is checked against its model before long work: ``d_in`` must equal
``d_model`` and its hook must read the residual stream after the layer
(``blocks.L.hook_resid_post``, or the equivalent ``blocks.{L+1}.hook_resid_pre``).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import faults
from .config import SAEConfig, digest
from .models import NONFINITE_FIX, LoadedModel, ModelInfo, check_finite
from .store import Entry, Store

log = logging.getLogger(__name__)

ACTS_BUDGET_BYTES = 4 << 30  # activations held at once while training SAEs
WEIGHTS = "sae_weights.safetensors"  # a sae-lens folder's weights (never a pickle)


class SAEError(ValueError):
    """An SAE does not fit its model or cannot be loaded."""


@dataclass(frozen=True)
class Quality:
    """Reconstruction quality of an SAE on a token sample."""

    l0: float              # mean number of active features per token
    fvu: float             # fraction of variance unexplained
    dead_fraction: float   # features never active on the sample
    n_tokens: int


def _training_sae(cfg: SAEConfig, d_in: int):
    from sae_lens import (
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
        TrainingSAE,
    )

    d_sae = cfg.expansion * d_in
    common = {"d_in": d_in, "d_sae": d_sae}
    if cfg.architecture == "topk":
        tcfg = TopKTrainingSAEConfig(k=cfg.topk, **common)
    elif cfg.architecture == "jumprelu":
        tcfg = JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l1_coefficient, **common)
    else:
        tcfg = StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)
    return TrainingSAE.from_dict(tcfg.to_dict())


def _batches(acts: torch.Tensor, batch: int, seed: int):
    """Endless shuffled batches of activation rows (a sae-lens data provider); each batch
    drawn is one training step (fault point ``sae_step``)."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, len(acts))
    while True:
        perm = torch.randperm(len(acts), generator=gen)
        for i in range(0, len(perm) - batch + 1, batch):
            faults.point("sae_step")
            yield acts[perm[i:i + batch]]


def sae_spec(model_key: str, layer: int, cfg: SAEConfig, windows_key: str) -> dict:
    return {"model": model_key, "layer": layer, "hook": f"blocks.{layer}.hook_resid_post",
            "sae": asdict(cfg), "windows": windows_key, "trainer": "activations"}


def collect_activations(model: LoadedModel, layers: list[int], windows, n_tokens: int,
                        batch_size: int = 16, label: str = "") -> dict[int, torch.Tensor]:
    """Residual activations at ``layers`` on the masked positions of ``windows``
    (float32, CPU), up to ``n_tokens`` rows per layer, one forward pass per batch."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    got = 0
    bar = tqdm(total=n_tokens, desc=f"activations {label}", unit="tok", mininterval=2)
    with torch.no_grad():
        for start in range(0, len(windows.tokens), batch_size):
            toks = torch.as_tensor(windows.tokens[start:start + batch_size], dtype=torch.long)
            keep = torch.as_tensor(windows.mask[start:start + batch_size])
            res = model.residuals(toks, layers)
            for layer in layers:
                acts = res[layer][keep.to(res[layer].device)].float().cpu()
                check_finite(acts, f"model {label} layer {layer}: activations on the SAE "
                             "training windows", NONFINITE_FIX)
                parts[layer].append(acts)
            got += int(keep.sum())
            bar.update(int(keep.sum()))
            if got >= n_tokens:
                break
    bar.close()
    return {layer: torch.cat(p)[:n_tokens] for layer, p in parts.items()}


def train_saes(model_key: str, get_model: Callable[[], LoadedModel], layers: list[int],
               cfg: SAEConfig, get_windows: Callable, windows_key: str, store: Store,
               label: str = "") -> dict[int, Entry]:
    """Train (or fetch) the SAEs of one model at ``layers``; returns layer -> entry.

    ``get_model`` and ``get_windows`` are only called when an SAE must be
    trained. The missing layers share forward passes, in groups sized so their
    activations fit in ``ACTS_BUDGET_BYTES``; each SAE is stored as soon as it is
    trained, so an interrupted run keeps the finished ones. An SAE interrupted
    while training is trained again from the start (seeded: the same weights); its
    store entry is only made, by a rename, once it is whole.
    """
    out = {layer: store.get("sae", sae_spec(model_key, layer, cfg, windows_key))
           for layer in layers}
    missing = [layer for layer, e in out.items() if e is None]
    if not missing:
        return out
    model, windows = get_model(), get_windows()
    per_layer = cfg.train_tokens * model.d_model * 4
    group = max(1, ACTS_BUDGET_BYTES // per_layer)
    for i in range(0, len(missing), group):
        layers_now = missing[i:i + group]
        acts = collect_activations(model, layers_now, windows, cfg.train_tokens,
                                   label=label or model.name)
        for layer in layers_now:
            def build(path: Path, layer=layer, acts=acts) -> dict:
                return _fit(model, layer, cfg, acts[layer], path)

            out[layer], _ = store.get_or_create(
                "sae", sae_spec(model_key, layer, cfg, windows_key), build)
            del acts[layer]
    return out


def _fit(model: LoadedModel, layer: int, cfg: SAEConfig, acts: torch.Tensor, path: Path) -> dict:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if len(acts) < cfg.batch_tokens:
        raise SAEError(f"only {len(acts)} training activations for {model.name} layer {layer}, "
                       f"fewer than one batch (sae.batch_tokens={cfg.batch_tokens}); use a "
                       "larger corpus or lower sae.batch_tokens")
    device = model.device
    torch.manual_seed(cfg.seed)
    sae = _training_sae(cfg, model.d_model)
    # train on activations scaled to mean norm sqrt(d_in), decoder bias at their mean (real
    # residual streams carry large constant directions); the scale is folded back afterwards
    scale = float(model.d_model ** 0.5 / acts.norm(dim=1).mean())
    acts = acts * scale
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    steps = cfg.train_tokens // cfg.batch_tokens
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.train_tokens, train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_warm_up_steps=max(1, steps // 20), device=device,
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0,
        n_batches_for_norm_estimate=min(100, max(1, steps)),
        dead_feature_window=max(50, steps // 4), feature_sampling_window=max(50, steps // 4))
    with _quiet():
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae,
                             data_provider=(b.to(device) for b in _batches(acts, cfg.batch_tokens,
                                                                           cfg.seed)))
        sae = trainer.fit()
        sae.fold_activation_norm_scaling_factor(scale)
    hook = model.hook(layer)
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = model.name
    sae.cfg.metadata.context_size = None
    sae.save_inference_model(str(path / "sae"))
    # one byte layout for one config: sae-lens writes cfg.json's keys in an order that can
    # differ between processes (same content), which would change the entry's checksums
    cfg_file = path / "sae" / "cfg.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()), indent=2, sort_keys=True))
    return {"model": model.name, "layer": layer, "hook": hook, "d_in": model.d_model,
            "d_sae": cfg.expansion * model.d_model, "architecture": cfg.architecture,
            "n_train_activations": int(len(acts)), "train_steps": steps, "input_scale": scale}


@contextlib.contextmanager
def _quiet():
    """Silence sae-lens's prints and warnings during training and loading."""
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_sae(entry: Entry, device: str = "cpu"):
    from sae_lens import SAE

    with _quiet():
        return SAE.load_from_disk(str(entry.path / "sae"), device=device).eval()


# -- pretrained SAEs: releases and local folders -------------------------------------

def release_lookup(release: str):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise SAEError(f"sae-lens has no release {release!r}"
                       + (f"; did you mean one of {close}?" if close else "")
                       + " (the list: sae_lens/pretrained_saes.yaml)")
    return directory[release]


def check_ref(ref, info: ModelInfo, layers: list[int], side: str) -> None:
    """Cheap checks of one side's SAE source, before any model runs.

    A release must exist and hold an id for every layer; a folder must exist for
    every layer, and its ``cfg.json`` must match the model's width and the layer.
    """
    if ref.source == "release":
        lookup = release_lookup(ref.release)
        for layer in layers:
            sae_id = ref.sae_id(layer)
            if sae_id not in lookup.saes_map:
                close = difflib.get_close_matches(sae_id, list(lookup.saes_map), n=3, cutoff=0.3)
                raise SAEError(f"sae_{side}: release {ref.release!r} has no SAE id {sae_id!r} "
                               f"(layer {layer}); close ids: {close}")
    elif ref.source == "folder":
        for layer in layers:
            folder = Path(ref.folder(layer)).expanduser()
            cfg_file = folder / "cfg.json"
            if not cfg_file.exists():
                raise SAEError(f"sae_{side}: {cfg_file} does not exist; a sae-lens folder holds "
                               "cfg.json and sae_weights.safetensors")
            if not (folder / WEIGHTS).is_file():
                raise SAEError(f"sae_{side}: {folder / WEIGHTS} does not exist; SAE weights are "
                               "read from safetensors only (convert a pickled .pt/.bin with "
                               "safetensors.torch.save_file)")
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError as err:
                raise SAEError(f"sae_{side}: {cfg_file} is not valid JSON ({err})") from None
            if not isinstance(cfg, dict):
                raise SAEError(f"sae_{side}: {cfg_file} must hold a JSON object (sae-lens's "
                               "SAE config)")
            for name in ("d_in", "d_sae"):
                value = cfg.get(name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or value < 1):
                    raise SAEError(f"sae_{side}: {cfg_file} has {name}={value!r}; it must be a "
                                   "positive integer")
            meta = cfg.get("metadata") or {}
            _check_fit(cfg.get("d_in"), meta.get("hook_name", cfg.get("hook_name")), info, layer,
                       f"sae_{side} ({folder})")


def neuronpedia_id(ref, layer: int) -> str | None:
    """The Neuronpedia id of a pretrained SAE (its public feature dashboards): from
    sae-lens's directory of releases, or a folder's ``cfg.json`` metadata; None for an SAE
    trained here or one without an id."""
    if ref.source == "release":
        ids = release_lookup(ref.release).neuronpedia_id or {}
        return ids.get(ref.sae_id(layer))
    if ref.source == "folder":
        try:
            cfg = json.loads((Path(ref.folder(layer)).expanduser() / "cfg.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(cfg, dict):
            return (cfg.get("metadata") or {}).get("neuronpedia_id") or cfg.get("neuronpedia_id")
    return None


def sae_key(ref, layer: int, store: Store) -> str:
    """Identity of a pretrained SAE: its release and id, or its folder's file hashes."""
    import sae_lens

    if ref.source == "release":
        return digest({"release": ref.release, "id": ref.sae_id(layer),
                       "sae_lens": sae_lens.__version__})
    folder = Path(ref.folder(layer)).expanduser()
    return digest({"folder": {p.name: store.file_sha256(p) for p in sorted(folder.iterdir())
                              if p.is_file() and p.suffix in (".json", ".safetensors")}})


def load_pretrained(ref, layer: int, device: str = "cpu"):
    """The SAE of ``layer`` from a release or a local folder."""
    from sae_lens import SAE

    with _quiet():
        try:
            if ref.source == "release":
                sae = SAE.from_pretrained(ref.release, ref.sae_id(layer), device=device)
            else:
                sae = SAE.load_from_disk(str(Path(ref.folder(layer)).expanduser()),
                                         device=device)
        except SAEError:
            raise
        except Exception as err:  # network, missing files, unknown architecture
            where = ref.release if ref.source == "release" else ref.path
            raise SAEError(f"cannot load the SAE of layer {layer} from {where!r}: "
                           f"{type(err).__name__}: {str(err)[:300]}") from None
    return sae.eval()


# -- compatibility and quality ----------------------------------------------------------

def hook_of(sae) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) if meta is not None else None


def reads_layer(hook: str, layer: int) -> bool:
    """Whether ``hook`` is the residual stream after block ``layer``."""
    return hook in (f"blocks.{layer}.hook_resid_post", f"blocks.{layer + 1}.hook_resid_pre")


def _check_fit(d_in, hook, info, layer: int, label: str) -> None:
    if d_in is not None and int(d_in) != info.d_model:
        raise SAEError(f"{label}: SAE d_in={d_in} but {info.name!r} has d_model={info.d_model}; "
                       "use an SAE trained on this model")
    if hook is not None and not reads_layer(hook, layer):
        raise SAEError(f"{label}: SAE reads {hook!r} but layer {layer} is "
                       f"'blocks.{layer}.hook_resid_post'; pick the SAE of that layer")


def check_compatible(sae, model, layer: int, label: str) -> None:
    """Raise SAEError unless the SAE reads ``model``'s residual stream at ``layer``."""
    _check_fit(sae.cfg.d_in, hook_of(sae), model, layer, label)


STAT_KEYS = ("n", "sumsq", "resid", "active")


def quality_stats(acts: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor) -> dict:
    """Sufficient statistics of L0, FVU and dead features for one batch (float64)."""
    f64 = torch.float64
    nz = codes > 0
    return {"n": acts.shape[0], "sum": acts.sum(0, dtype=f64).cpu().numpy(),
            "sumsq": float((acts * acts).sum(dtype=f64)),
            "resid": float(((acts - recon) ** 2).sum(dtype=f64)), "active": int(nz.sum()),
            "alive": nz.any(0).cpu().numpy()}


def merge_quality(stats: list[dict]) -> Quality:
    """Quality over every batch whose ``quality_stats`` are in ``stats``."""
    n = sum(s["n"] for s in stats)
    total_sum = np.sum([s["sum"] for s in stats], axis=0)
    sumsq = sum(s["sumsq"] for s in stats)
    total = sumsq - float((total_sum ** 2).sum()) / max(n, 1)
    alive = np.any([s["alive"] for s in stats], axis=0)
    return Quality(l0=sum(s["active"] for s in stats) / max(n, 1),
                   fvu=sum(s["resid"] for s in stats) / max(total, 1e-30),
                   dead_fraction=float(1 - alive.mean()), n_tokens=n)


@torch.no_grad()
def quality(sae, acts: torch.Tensor) -> Quality:
    """L0, FVU and dead fraction of ``sae`` on activations ``acts`` (tokens, d_in)."""
    codes = sae.encode(acts)
    return merge_quality([quality_stats(acts, codes, sae.decode(codes))])
