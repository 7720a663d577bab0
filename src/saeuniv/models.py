"""Models: the built-in scaled family of transformer-lens language models.

Every member of the family shares the tokenizer, the training windows, their
order and the seed; only width and depth differ, so the comparison isolates
scale. Trained weights are cached in the store under a hash of everything that
determines them and loaded back with ``weights_only`` safetensors.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import FamilyConfig, MemberConfig
from .corpus import read_split
from .store import Entry, Store
from .tokens import load_tokenizer, make_windows


class ModelError(ValueError):
    """A model cannot be found, loaded or used as asked."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for extraction, with what the rest of the pipeline needs to know."""

    name: str
    model: torch.nn.Module
    n_layers: int
    d_model: int
    entry: Entry

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    def check_layers(self, layers: list[int], side: str) -> None:
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise ModelError(
                f"{side}: layer(s) {bad} are out of range for {self.name!r}, which has "
                f"{self.n_layers} layers (valid: 0..{self.n_layers - 1})")


def set_threads() -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def tl_config(member: MemberConfig, vocab_size: int, context: int, seed: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=member.n_layers, d_model=member.d_model, d_head=member.d_head,
        n_heads=member.d_model // member.d_head, d_mlp=member.d_mlp, d_vocab=vocab_size,
        n_ctx=context, act_fn="gelu", normalization_type="LN", device="cpu", seed=seed,
        default_prepend_bos=False)


def build_model(cfg_dict: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**cfg_dict))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("embed.", "unembed.", "pos_embed.")))
    return total, total - embed


def member_spec(member: MemberConfig, family: FamilyConfig, tokenizer: Entry) -> dict:
    train = {k: v for k, v in asdict(family).items() if k != "members"}
    return {"member": asdict(member), "train": train, "tokenizer": tokenizer.key}


def train_family(family: FamilyConfig, corpus: Entry, tokenizer: Entry, store: Store,
                 names: list[str] | None = None) -> dict[str, Entry]:
    """Train (or fetch from the store) the family members named in ``names``.

    Returns a mapping from member name to its store entry.
    """
    members = [m for m in family.members if names is None or m.name in names]
    tok = load_tokenizer(tokenizer)
    cache: dict[str, np.ndarray] = {}

    def windows(split: str, n_tokens: int | None) -> np.ndarray:
        if split not in cache:
            docs = [d["text"] for d in read_split(corpus, split)]
            cache[split] = make_windows(docs, tok, family.context, n_tokens, pack=True).tokens
        return cache[split]

    out = {}
    for member in members:
        spec = member_spec(member, family, tokenizer)

        def build(path: Path, member=member) -> dict:
            # every training window is eligible; the seeded order picks the ones used
            train = windows("train", None)
            val = windows("analysis", family.eval_batches * family.batch_size
                          * (family.context - 1))
            return _train_member(member, family, tok.vocab_size, train, val, path)

        out[member.name], _ = store.get_or_create("model", spec, build)
    return out


def _lr(step: int, n_steps: int, peak: float) -> float:
    warm = max(1, n_steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, n_steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _val_loss(model, val: np.ndarray, batch: int) -> float:
    model.eval()
    losses = [float(model(torch.as_tensor(val[i:i + batch], dtype=torch.long),
                          return_type="loss")) for i in range(0, len(val), batch)]
    model.train()
    return float(np.mean(losses))


def _train_member(member, family, vocab_size, train, val, path) -> dict:
    set_threads()
    torch.manual_seed(family.seed)
    cfg = tl_config(member, vocab_size, family.context, family.seed)
    model = build_model(cfg.to_dict())
    total, non_embed = count_params(model)
    n_steps = family.train_tokens // (family.batch_size * family.context)
    if len(train) < n_steps * family.batch_size:
        raise ModelError(
            f"the training split has {len(train)} windows but {n_steps * family.batch_size} are "
            f"needed for family.train_tokens={family.train_tokens}; lower it or use a larger corpus")
    order = np.random.default_rng(family.seed).permutation(len(train))
    opt = torch.optim.AdamW(model.parameters(), lr=family.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    curve = []
    start = time.time()
    bar = tqdm(range(n_steps), desc=f"train {member.name}", unit="step", mininterval=2)
    for step in bar:
        idx = order[step * family.batch_size:(step + 1) * family.batch_size]
        for group in opt.param_groups:
            group["lr"] = _lr(step, n_steps, family.lr)
        loss = model(torch.as_tensor(train[idx], dtype=torch.long), return_type="loss")
        if not torch.isfinite(loss):
            raise ModelError(f"training {member.name} diverged at step {step} (loss {loss}); "
                             "lower family.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % family.eval_every == 0 or step + 1 == n_steps:
            v = _val_loss(model, val, family.batch_size)
            curve.append((step + 1, v))
            bar.set_postfix(val_loss=f"{v:.3f}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    return {"name": member.name, "params": total, "non_embedding_params": non_embed,
            "val_loss": curve[-1][1], "val_curve": curve, "train_seconds": time.time() - start,
            "n_layers": member.n_layers, "d_model": member.d_model}


def load_family_model(entry: Entry) -> LoadedModel:
    from safetensors.torch import load_file

    cfg = json.loads(entry.file("config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k in _TL_FIELDS}
    model = build_model(cfg)
    model.load_state_dict(load_file(str(entry.file("model.safetensors"))), strict=True)
    model.eval()
    return LoadedModel(entry.meta["name"], model, cfg["n_layers"], cfg["d_model"], entry)


_TL_FIELDS = (
    "n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "n_ctx", "act_fn",
    "normalization_type", "seed", "default_prepend_bos", "positional_embedding_type",
    "d_vocab_out", "attn_only", "original_architecture", "init_weights",
)
