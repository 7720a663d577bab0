"""SAEs: train one per (model, layer) with sae-lens, load them, and measure their quality.

Training uses sae-lens's ``LanguageModelSAETrainingRunner`` on the in-memory
model and a pretokenized in-memory dataset, with wandb logging off. Each SAE is
cached in the store under a hash of the model, layer, hook, training windows and
SAE settings, in sae-lens's own folder format (``cfg.json`` +
``sae_weights.safetensors``), so ``SAE.load_from_disk`` reads it back.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import SAEConfig
from .models import LoadedModel
from .store import Entry, Store

log = logging.getLogger(__name__)


class SAEError(ValueError):
    """An SAE does not fit its model or cannot be loaded."""


@dataclass(frozen=True)
class Quality:
    """Reconstruction quality of an SAE on a token sample."""

    l0: float              # mean number of active features per token
    fvu: float             # fraction of variance unexplained
    dead_fraction: float   # features never active on the sample
    n_tokens: int


def _training_sae_config(cfg: SAEConfig, d_in: int):
    from sae_lens import (JumpReLUTrainingSAEConfig, StandardTrainingSAEConfig,
                          TopKTrainingSAEConfig)

    d_sae = cfg.expansion * d_in
    if cfg.architecture == "topk":
        return TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=cfg.topk)
    if cfg.architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=cfg.l1_coefficient)
    return StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient)


def train_sae(model_entry: Entry, get_model: Callable[[], LoadedModel], layer: int,
              cfg: SAEConfig, get_windows: Callable[[], np.ndarray], windows_key: str,
              special_ids: list[int], store: Store) -> tuple[Entry, bool]:
    """Train (or fetch) the SAE at ``layer`` of the model in ``model_entry``.

    ``get_model`` and ``get_windows`` are only called when the SAE must be trained,
    so a cached SAE costs neither a model load nor a tokenization pass.
    Returns ``(entry, created)``.
    """
    hook = f"blocks.{layer}.hook_resid_post"
    spec = {"model": model_entry.key, "layer": layer, "hook": hook, "sae": asdict(cfg),
            "windows": windows_key}

    def build(out: Path) -> dict:
        model = get_model()
        train_windows = get_windows()
        import datasets
        from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
        from sae_lens.config import LoggingConfig

        context = int(train_windows.shape[1])
        n_rows = -(-cfg.train_tokens // context) + 64
        rows = train_windows[:n_rows]
        buffer = max(4, -(-cfg.batch_tokens // context) * 2)
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=_training_sae_config(cfg, model.d_model),
            model_name=model.name, hook_name=hook, dataset_path="",
            is_dataset_tokenized=True, streaming=False, context_size=context,
            prepend_bos=False, exclude_special_tokens=list(special_ids),
            training_tokens=cfg.train_tokens, train_batch_size_tokens=cfg.batch_tokens,
            n_batches_in_buffer=buffer, store_batch_size_prompts=8, n_eval_batches=2,
            eval_batch_size_prompts=4, device="cpu", lr=cfg.lr, seed=cfg.seed,
            logger=LoggingConfig(log_to_wandb=False), checkpoint_path=str(out / "ckpt"),
            output_path=str(out / "sae"), n_checkpoints=0, verbose=False)
        ds = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
        torch.manual_seed(cfg.seed)
        with _quiet():
            LanguageModelSAETrainingRunner(runner_cfg, override_dataset=ds,
                                           override_model=model.model).run()
        shutil.rmtree(out / "ckpt", ignore_errors=True)
        return {"model": model.name, "layer": layer, "hook": hook, "d_in": model.d_model,
                "d_sae": cfg.expansion * model.d_model, "architecture": cfg.architecture}

    return store.get_or_create("sae", spec, build)


@contextlib.contextmanager
def _quiet():
    """Silence sae-lens's prints and its warnings about the override model/dataset."""
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_sae(entry: Entry):
    from sae_lens import SAE

    with _quiet():
        return SAE.load_from_disk(str(entry.path / "sae"), device="cpu")


def hook_of(sae) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) if meta is not None else None


def check_compatible(sae, model: LoadedModel, layer: int, label: str) -> None:
    """Raise SAEError unless the SAE reads ``model``'s residual stream at ``layer``."""
    if sae.cfg.d_in != model.d_model:
        raise SAEError(
            f"{label}: SAE d_in={sae.cfg.d_in} but {model.name!r} has d_model={model.d_model}; "
            "use an SAE trained on this model")
    hook = hook_of(sae)
    if hook is not None and hook != model.hook(layer):
        raise SAEError(
            f"{label}: SAE reads {hook!r} but layer {layer} is {model.hook(layer)!r}; "
            "pick the SAE of that layer")


@torch.no_grad()
def quality(sae, acts: torch.Tensor) -> Quality:
    """L0, FVU and dead fraction of ``sae`` on activations ``acts`` (tokens, d_in)."""
    codes = sae.encode(acts)
    recon = sae.decode(codes)
    resid = ((acts - recon) ** 2).sum()
    total = ((acts - acts.mean(0)) ** 2).sum()
    active = codes > 0
    return Quality(
        l0=float(active.sum(1).float().mean()), fvu=float(resid / total),
        dead_fraction=float((~active.any(0)).float().mean()), n_tokens=int(acts.shape[0]))
