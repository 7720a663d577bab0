"""A tiny llama GGUF file with an embedded byte-level BPE tokenizer, written with the ``gguf``
package the way llama.cpp's converter writes one, and the Hugging Face model and tokenizer it
was written from (the reference the loaded file must reproduce)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers import bpe_tokenizer

# "<|endoftext|>" as in GPT-2-style vocabularies: transformers adds it to a gpt2-type GGUF
# tokenizer that lacks it (one token more than the model embeds)
SPECIALS = ["<s>", "</s>", "<pad>", "<|endoftext|>"]
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def reference_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on the synthetic text, BOS prepended (a fast tokenizer)."""
    return bpe_tokenizer(vocab_size, bos=True, specials=SPECIALS)


def reference_model(tok, seed: int = 0):
    """A random tiny Llama (GQA: 4 query heads, 2 key/value heads), untied output head, with
    norm weights away from 1 so a norm read wrongly shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **LLAMA)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of query and key rows for its rotary embedding."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(path: Path, model, tok) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tok`` as a float32 llama GGUF file."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(LLAMA["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        w = tensor.float().numpy()
        if base.endswith("q_proj"):
            w = _permute(w, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tok) -> None:
    import gguf

    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(True)
