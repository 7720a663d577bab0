"""A model's unembedding as it acts on a residual direction: what a decoder row of an SAE
would do to the next-token logits (the vocabulary effect of ``match.compare``).

A direction ``v`` in the residual stream before the final norm moves the logits by about
``v @ W``, where ``W`` (d_model, V) is the output head with the final norm's gain folded
in: ``g * W_U`` for an RMSNorm (``(1 + g) * W_U`` for Gemma's), and for a LayerNorm also
centred over d_model, because the norm removes a direction's mean before scaling it. The
norm's division by the residual's scale is left out: it scales every direction alike and
cancels in a cosine.

The head is read where it is stored: transformer-lens models hold ``W_U``; a GGUF file
holds ``output.weight``, or ties the head to ``token_embd.weight``; a Hugging Face model
ties it to its input embeddings or is loaded once more with its head.
"""

from __future__ import annotations

import numpy as np
import torch

from .models import LoadedModel, gguf_location, hf_blocks, hf_source, hf_text_config
from .store import Store


def unembedding(loaded: LoadedModel, ref=None, store: Store | None = None,
                random_init: bool = False) -> np.ndarray | None:
    """The folded unembedding of ``loaded``, float32, shape (d_model, V).

    ``ref`` and ``store`` locate an outside model's files (GGUF or Hugging Face), where an
    untied head is read from. None for a randomly initialised outside model with an untied
    head: its head was never drawn.
    """
    if loaded.backend == "tl":
        return _tl_unembedding(loaded.model)
    base, _ = hf_blocks(loaded.model)
    head = _hf_head(loaded.model, base, ref, store, random_init)
    if head is None:
        return None
    return _fold(head.T.astype(np.float32), getattr(base, "norm", None))


def _tl_unembedding(model) -> np.ndarray:
    w_u = model.W_U.detach().float().cpu().numpy()
    kind = model.cfg.normalization_type
    if kind not in ("LN", "RMS"):
        return w_u  # no final norm, or one with its gain already folded into W_U
    w_u = model.ln_final.w.detach().float().cpu().numpy()[:, None] * w_u
    return w_u - w_u.mean(0, keepdims=True) if kind == "LN" else w_u


def _hf_head(model, base, ref, store, random_init: bool) -> np.ndarray | None:
    """The output head (V, d_model) of a Hugging Face or GGUF model."""
    embed = base.get_input_embeddings().weight.detach().float().cpu().numpy()
    if ref is not None and ref.source == "gguf":
        head = _gguf_tensor(gguf_location(ref, store), "output.weight")
        if head is None:
            return embed  # no output.weight: the head is tied to token_embd
        return None if random_init else head
    if getattr(hf_text_config(model.config), "tie_word_embeddings", False):
        return embed
    if random_init or ref is None:
        return None
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(hf_source(ref)[0], dtype=torch.float32)
    return full.get_output_embeddings().weight.detach().numpy()


def _gguf_tensor(path, name: str) -> np.ndarray | None:
    """A GGUF tensor dequantized to float32 in Hugging Face's layout (None: absent)."""
    from gguf import GGUFReader, dequantize

    for t in GGUFReader(str(path)).tensors:
        if t.name == name:
            return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    return None


def _fold(w_u: np.ndarray, norm) -> np.ndarray:
    """``w_u`` (d, V) with the final norm's gain folded in (LayerNorm: and centred)."""
    if norm is None or getattr(norm, "weight", None) is None:
        return w_u
    gain = norm.weight.detach().float().cpu().numpy()
    if type(norm).__name__.startswith("Gemma"):
        gain = 1.0 + gain  # Gemma's RMSNorm scales by (1 + weight)
    w_u = gain[:, None] * w_u
    if isinstance(norm, torch.nn.LayerNorm):
        w_u = w_u - w_u.mean(0, keepdims=True)
    return w_u
