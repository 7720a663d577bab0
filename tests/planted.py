"""A model pair whose answer is known by construction (for ``tests/stages/test_planted.py``).

Model A is a tiny random Llama whose residual stream lives in the first ``D_LIVE`` of its
``D_MODEL`` coordinates (embeddings and every block's output projections are zero outside
them) and whose RMSNorm weights are 1, so that RMSNorm(R x) = R RMSNorm(x) for an
orthogonal R. Model B is A with its residual stream rotated by a seeded random orthogonal
R: weights that read the stream become W R^T, weights that write to it R W, so B's
``blocks.L.hook_resid_post`` is R times A's.

A's SAE at each layer has random unit decoder rows inside the live subspace, an encoder
equal to the decoder plus a large random part in the dead subspace (which the stream never
visits, so it changes no code but makes encoder rows differ from decoder rows), a decoder
bias at the activations' mean and encoder biases that let each feature fire on about 15%
of the tokens. B's SAE at layer L is A's rotated by R, with its features in a seeded order
``perm[L]`` (B's feature j is A's feature ``perm[L][j]``; a new order per layer) and a
little noise on both encoder and decoder. So B's codes are A's codes reordered, the
planted pairs are (perm[L][j], j), and the paired decoder rows are the same vectors up to
R and noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers import bpe_tokenizer, synthetic_text

D_MODEL, D_LIVE, N_LAYERS, D_SAE = 16, 12, 2, 64
ENC_DEAD_NORM = 3.0   # norm of each encoder column's part outside the live subspace
FIRE_FRACTION = 0.15  # tokens on which each feature of A fires
ENC_NOISE, DEC_NOISE = 0.01, 0.05  # B's SAE: per-coordinate noise added inside the live subspace


def tokenizer(folder: Path):
    """A byte-level BPE that reads a BOS, saved as a Hugging Face tokenizer in ``folder``."""
    fast = bpe_tokenizer(300, bos=True, seed=3)
    fast.save_pretrained(str(folder))
    return fast


def rotation(d: int, seed: int) -> np.ndarray:
    """A random orthogonal matrix (d, d), Haar-distributed, from ``seed``."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def model_a(tok, seed: int = 0):
    """Model A: a random Llama whose residual stream stays in the live subspace."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=48,
        num_hidden_layers=N_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, D_LIVE:] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[D_LIVE:] = 0
            block.mlp.down_proj.weight[D_LIVE:] = 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    return model.eval()


WRITES = ("o_proj.weight", "down_proj.weight")  # (d_model, ·): write to the residual stream


def rotated(model, R: np.ndarray):
    """A copy of ``model`` with its residual stream rotated by R (reads W R^T, writes R W)."""
    import copy

    rot = torch.as_tensor(R, dtype=torch.float32)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(rot @ p if name.endswith(WRITES) else p @ rot.T)
    return out


def residuals(model, ids: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """Output of each decoder block in ``layers`` for ``ids`` (batch, seq), read with forward
    hooks written here (not the pipeline's)."""
    out = {}
    handles = [model.model.layers[layer].register_forward_hook(
        lambda mod, args, o, layer=layer: out.__setitem__(layer, o[0] if isinstance(o, tuple)
                                                          else o)) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return out


def sample_ids(tok, n_docs: int = 40, context: int = 32) -> torch.Tensor:
    """Token windows (n, context) of synthetic text the SAE biases are fitted on."""
    rows = []
    for text in synthetic_text(n_docs, seed=5):
        ids = tok(text)["input_ids"]
        rows += [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
    return torch.as_tensor(rows)


def sae_a(acts: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """A's SAE for activations ``acts`` (n, D_MODEL): sae-lens weight names and shapes."""
    rng = np.random.default_rng(seed)
    dec = np.zeros((D_SAE, D_MODEL))
    dec[:, :D_LIVE] = rng.standard_normal((D_SAE, D_LIVE))
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    dead = np.zeros((D_MODEL, D_SAE))
    dead[D_LIVE:] = rng.standard_normal((D_MODEL - D_LIVE, D_SAE))
    dead *= ENC_DEAD_NORM / np.linalg.norm(dead, axis=0, keepdims=True)
    b_dec = acts.mean(axis=0)
    pre = (acts - b_dec) @ dec.T
    b_enc = -np.quantile(pre, 1 - FIRE_FRACTION, axis=0)
    return {"W_dec": dec, "W_enc": dec.T + dead, "b_enc": b_enc, "b_dec": b_dec}


def sae_b(a: dict, R: np.ndarray, perm: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """B's SAE: A's rotated by R, features reordered by ``perm``, a little noise inside the
    live subspace, and a fresh random encoder part in the dead subspace (in B's basis)."""
    rng = np.random.default_rng(seed)
    live = np.zeros(D_MODEL)
    live[:D_LIVE] = 1.0
    enc = a["W_enc"][:, perm] * live[:, None] + ENC_NOISE * rng.standard_normal(
        (D_MODEL, D_SAE)) * live[:, None]
    dead = rng.standard_normal((D_MODEL, D_SAE)) * (1 - live)[:, None]
    enc += dead * ENC_DEAD_NORM / np.linalg.norm(dead, axis=0, keepdims=True)
    dec = a["W_dec"][perm] + DEC_NOISE * rng.standard_normal((D_SAE, D_MODEL)) * live
    return {"W_dec": dec @ R.T, "W_enc": R @ enc, "b_enc": a["b_enc"][perm],
            "b_dec": R @ a["b_dec"]}


def write_sae(folder: Path, weights: dict[str, np.ndarray], layer: int) -> Path:
    """Save ``weights`` as a sae-lens standard SAE reading ``blocks.{layer}.hook_resid_post``."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = StandardSAE(cfg)
    sae.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in weights.items()})
    sae.save_model(folder)
    return folder


def build(root: Path, seed: int = 0) -> dict:
    """Write models A and B (``root/a``, ``root/b``) and SAE folders under ``root/sae``:
    ``a``, ``b`` (planted), ``b_wrong_layer`` (layer L holds B's SAE of the other layer, its
    cfg naming layer L) and ``b_shuffled`` (B's decoder rows in a random order, encoder
    unchanged). Returns the paths, R and the planted orders."""
    tok = tokenizer(root / "a")
    a = model_a(tok, seed)
    R = rotation(D_MODEL, seed + 1)
    b = rotated(a, R)
    a.save_pretrained(str(root / "a"))
    b.save_pretrained(str(root / "b"))
    tok.save_pretrained(str(root / "b"))
    ids = sample_ids(tok)
    acts = residuals(a, ids, range(N_LAYERS))
    rng = np.random.default_rng(seed + 2)
    perms = {layer: rng.permutation(D_SAE) for layer in range(N_LAYERS)}
    saes = {}
    for layer in range(N_LAYERS):
        x = acts[layer].reshape(-1, D_MODEL)[ids.reshape(-1) != tok.bos_token_id].double()
        wa = sae_a(x.numpy(), seed=100 + layer)
        saes[layer] = (wa, sae_b(wa, R, perms[layer], seed=200 + layer))
    sae = root / "sae"
    for layer, (wa, wb) in saes.items():
        write_sae(sae / "a" / f"layer_{layer}", wa, layer)
        write_sae(sae / "b" / f"layer_{layer}", wb, layer)
        other = saes[(layer + 1) % N_LAYERS][1]
        write_sae(sae / "b_wrong_layer" / f"layer_{layer}", other, layer)
        shuffle = np.random.default_rng(300 + layer).permutation(D_SAE)
        write_sae(sae / "b_shuffled" / f"layer_{layer}", dict(wb, W_dec=wb["W_dec"][shuffle]),
                  layer)
    (root / "planted.json").write_text(json.dumps({str(k): v.tolist() for k, v in perms.items()}))
    return {"a": root / "a", "b": root / "b", "sae": sae, "R": R, "perms": perms,
            "tokenizer": tok}
