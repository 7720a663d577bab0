"""Models: the built-in scaled family, transformer-lens official models, Hugging Face
folders and GGUF files, all read at ``blocks.L.hook_resid_post``.

Every member of the built-in family shares the tokenizer, the training windows,
their order and the seed; only width and depth differ, so the comparison
isolates scale. Trained weights are cached in the store under a hash of
everything that determines them and loaded back from safetensors.

Two backends give the residual stream after block ``L``:

* transformer-lens (the family, official names): ``run_with_cache`` on
  ``blocks.L.hook_resid_post`` with ``stop_at_layer``;
* Hugging Face (local folders, hub ids, GGUF files): a forward hook on decoder
  block ``L`` that reads its output, which is ``hidden_states[L + 1]`` (the last
  entry of ``hidden_states`` is after the final norm, the hook is before it).
  The forward pass stops at the deepest block needed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
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


class ActivationError(ModelError):
    """A model's activations (or an SAE's codes) hold NaN or inf values."""


def check_finite(values: torch.Tensor, what: str, fix: str) -> None:
    """Raise ActivationError when ``values`` (tokens, features) hold NaN or inf: the message
    names ``what``, the counts of NaN and inf values and of the tokens they are in, and
    ``fix``. One reduction when all is well."""
    if bool(torch.isfinite(values.sum(dtype=torch.float64))):
        return
    bad = ~torch.isfinite(values)
    n_nan = int(torch.isnan(values).sum())
    raise ActivationError(
        f"{what}: {n_nan} NaN and {int(bad.sum()) - n_nan} inf value(s) in "
        f"{int(bad.reshape(len(values), -1).any(1).sum())} of {len(values)} token(s); {fix}")


NONFINITE_FIX = "check the model's weights and dtype (try dtype: float32)"


class _Stop(Exception):
    """Raised by the deepest hook to end a Hugging Face forward pass early."""


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read without loading its weights."""

    name: str
    n_layers: int
    d_model: int


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for extraction, with what the rest of the pipeline needs to know.

    ``key`` identifies the weights and dtype (a store key or content hash);
    ``backend`` is ``tl`` or ``hf``.
    """

    name: str
    model: torch.nn.Module
    n_layers: int
    d_model: int
    key: str
    backend: str = "tl"
    device: str = "cpu"

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    def residuals(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Residual stream after each block in ``layers`` for ``tokens`` (batch, seq).

        The forward pass stops after the deepest block asked for.
        """
        tokens = tokens.to(self.device)
        if self.backend == "tl":
            hooks = {self.hook(layer): layer for layer in layers}
            _, cache = self.model.run_with_cache(
                tokens, names_filter=lambda name: name in hooks, stop_at_layer=max(layers) + 1)
            return {layer: cache[h] for h, layer in hooks.items()}
        base, blocks = hf_blocks(self.model)
        out: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def grab(layer):
            def hook(module, args, output):
                out[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _Stop
            return hook

        handles = [blocks[layer].register_forward_hook(grab(layer)) for layer in layers]
        try:
            base(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def check_layers(self, layers: list[int], side: str) -> None:
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
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
            f"needed for family.train_tokens={family.train_tokens}; lower it or use a larger "
            "corpus")
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
    return LoadedModel(entry.meta["name"], model, cfg["n_layers"], cfg["d_model"], entry.key)


def random_family_model(entry: Entry, key: str) -> LoadedModel:
    """The family member of ``entry`` with the weights it was initialised with before
    training (its config holds the seed): the no-learning control."""
    cfg = json.loads(entry.file("config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k in _TL_FIELDS}
    model = build_model(cfg).eval()
    return LoadedModel(f"{entry.meta['name']} (random init)", model, cfg["n_layers"],
                       cfg["d_model"], key)


_TL_FIELDS = (
    "n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "n_ctx", "act_fn",
    "normalization_type", "seed", "default_prepend_bos", "positional_embedding_type",
    "d_vocab_out", "attn_only", "original_architecture", "init_weights",
)


# -- models from outside: transformer-lens names, HF folders and hub ids, GGUF ----------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no GPU is visible; use device: auto")
    return device


def hf_blocks(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(base model, its list of decoder blocks) of a Hugging Face causal LM."""
    base = getattr(model, "base_model", model)
    n = hf_text_config(model.config).num_hidden_layers
    for _name, child in base.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return base, child
    raise ModelError(f"cannot find the {n} decoder blocks of {type(model).__name__}; "
                     "supported: models whose base model holds them in one ModuleList")


def hf_text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def gguf_location(ref, store: Store) -> Path:
    from .registry import resolve_gguf

    return resolve_gguf(ref.path, store)


def hf_source(ref) -> tuple[str, bool]:
    """(folder or repo id, is_local) of an ``hf`` model."""
    where = ref.path or ref.name
    local = Path(where).expanduser()
    if local.is_dir():
        return str(local.resolve()), True
    if ref.path and (ref.path.startswith((".", "/", "~")) or local.suffix):
        raise ModelError(f"model folder {ref.path!r} does not exist; give a folder holding "
                         "config.json, the weights and the tokenizer")
    return where, False


def model_identity(ref, store: Store) -> dict:
    """A spec that changes whenever the weights or the dtype do (weights are not loaded)."""
    if ref.source == "gguf":
        path = gguf_location(ref, store)
        return {"source": "gguf", "sha256": store.file_sha256(path), "dtype": ref.dtype}
    if ref.source == "hf":
        where, local = hf_source(ref)
        if not local:
            return {"source": "hf", "repo": where, "dtype": ref.dtype}
        files = sorted(p for p in Path(where).iterdir()
                       if p.suffix in (".safetensors", ".bin", ".json", ".model"))
        return {"source": "hf", "files": {p.name: store.file_sha256(p) for p in files},
                "dtype": ref.dtype}
    return {"source": ref.source, "name": ref.name, "dtype": ref.dtype}


def describe(ref, store: Store) -> ModelInfo:
    """Layers and width of an outside model, from its config alone."""
    try:
        if ref.source == "transformer_lens":
            from transformer_lens.loading_from_pretrained import get_pretrained_model_config

            cfg = get_pretrained_model_config(ref.name)
            return ModelInfo(ref.name, cfg.n_layers, cfg.d_model)
        from transformers import AutoConfig

        if ref.source == "gguf":
            path = gguf_location(ref, store)
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(hf_source(ref)[0])
    except ModelError:
        raise
    except Exception as err:  # hub errors, unknown names, unreadable files
        raise ModelError(f"cannot read the config of model {ref.name or ref.path!r} "
                         f"({ref.source}): {type(err).__name__}: {str(err)[:300]}") from None
    text = hf_text_config(config)
    return ModelInfo(ref.name or ref.path, int(text.num_hidden_layers), int(text.hidden_size))


def load_outside_model(ref, store: Store, key: str) -> LoadedModel:
    """Load a ``transformer_lens``, ``hf`` or ``gguf`` model for extraction (eval mode);
    Hugging Face and GGUF models are loaded without their output head."""
    device, dtype = resolve_device(ref.device), DTYPES[ref.dtype]
    set_threads()
    if ref.source == "transformer_lens":
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(ref.name, device=device,
                                                                dtype=dtype)
        model.eval()
        return LoadedModel(ref.name, model, model.cfg.n_layers, model.cfg.d_model, key, "tl",
                           device)
    # the base model, without the output head: only the residual stream is read, and a
    # large vocabulary's head (Qwen2.5's 151,936 x d_model) is most of the load's memory
    from transformers import AutoModel

    if ref.source == "gguf":
        path = gguf_location(ref, store)
        model = AutoModel.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModel.from_pretrained(hf_source(ref)[0], dtype=dtype)
    model.to(device).eval()
    text = hf_text_config(model.config)
    hf_blocks(model)  # fail now if the blocks cannot be found
    return LoadedModel(ref.name or ref.path, model, int(text.num_hidden_layers),
                       int(text.hidden_size), key, "hf", device)


def random_outside_model(ref, store: Store, key: str, seed: int = 0) -> LoadedModel:
    """An outside model's architecture with freshly initialised weights (seeded), read from
    its config alone: the no-learning control. Hugging Face and GGUF models without their
    output head, as in ``load_outside_model``."""
    device, dtype = resolve_device(ref.device), DTYPES[ref.dtype]
    set_threads()
    name = f"{ref.name or ref.path} (random init)"
    torch.manual_seed(seed)
    if ref.source == "transformer_lens":
        from transformer_lens import HookedTransformer
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        cfg = get_pretrained_model_config(ref.name, device=device, dtype=dtype)
        cfg.seed = seed
        model = HookedTransformer(cfg).eval()
        return LoadedModel(name, model, cfg.n_layers, cfg.d_model, key, "tl", device)
    from transformers import AutoConfig, AutoModel

    if ref.source == "gguf":
        path = gguf_location(ref, store)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        config = AutoConfig.from_pretrained(hf_source(ref)[0])
    model = AutoModel.from_config(config, dtype=dtype).to(device).eval()
    text = hf_text_config(model.config)
    hf_blocks(model)
    return LoadedModel(name, model, int(text.num_hidden_layers), int(text.hidden_size), key,
                       "hf", device)


def outside_tokenizer(ref, store: Store, identity: dict) -> Entry:
    """The model's own tokenizer, saved in the store; ``meta['bos']`` says if it reads BOS."""

    def build(out: Path) -> dict:
        from transformers import AutoTokenizer

        if ref.source == "gguf":
            path = gguf_location(ref, store)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        elif ref.source == "transformer_lens":
            from transformer_lens.loading_from_pretrained import (
                get_official_model_name,
                get_pretrained_model_config,
            )

            tok = AutoTokenizer.from_pretrained(get_official_model_name(ref.name))
        else:
            tok = AutoTokenizer.from_pretrained(hf_source(ref)[0])
        if not tok.is_fast:
            raise ModelError(f"the tokenizer of {ref.name or ref.path!r} is not a fast "
                             "tokenizer; character offsets need one (tokenizer.json)")
        if ref.source == "transformer_lens":
            bos = bool(get_pretrained_model_config(ref.name).default_prepend_bos)
        else:
            ids = tok("a", add_special_tokens=True)["input_ids"]
            bos = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
        tok.save_pretrained(str(out))
        if not (out / "tokenizer.json").exists():
            raise ModelError(f"the tokenizer of {ref.name or ref.path!r} did not save a "
                             "tokenizer.json")
        return {"bos": bos, "vocab_size": len(tok)}

    spec = {k: v for k, v in identity.items() if k != "dtype"}
    entry, _ = store.get_or_create("tokenizer", {"model": spec}, build)
    return entry
