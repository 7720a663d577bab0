"""GGUF models (``source: gguf``): a tiny llama GGUF written by the test with the ``gguf``
package, read through the project's loader, must give the weights and the tokenizer it was
written from: the same logits and residual stream, the same token ids."""

from __future__ import annotations

import hashlib

import pytest
import torch

from saeuniv.config import load_config
from saeuniv.models import (
    describe,
    load_outside_model,
    model_identity,
    outside_tokenizer,
)
from saeuniv.store import Store
from saeuniv.tokens import load_tokenizer

from gguf_files import LLAMA, reference_model, reference_tokenizer, write_gguf
from helpers import synthetic_text

SENTENCES = ["The whale follows the storm in New York, last week!",
             "  Twice the captain   said:\n\ncafé, 3.14 and <s> inside",
             *synthetic_text(3, seed=7)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the GGUF file, the reference LlamaForCausalLM, the reference tokenizer)."""
    tok = reference_tokenizer()
    model = reference_model(tok)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf", model, tok)
    return path, model, tok


def gguf_ref(path: str):
    return load_config("tiny", {"model_a": {"source": "gguf", "name": "tiny-llama",
                                            "path": str(path), "device": "cpu"}}).model_a


def test_gguf_model_computes_what_the_llama_it_was_written_from_computes(tiny_gguf, tmp_path):
    path, reference, tok = tiny_gguf
    ref, store = gguf_ref(path), Store(tmp_path / "store")
    info = describe(ref, store)
    assert (info.n_layers, info.d_model) == (LLAMA["num_hidden_layers"], LLAMA["hidden_size"])
    identity = model_identity(ref, store)
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_outside_model(ref, store, key="k")
    assert (model.backend, model.n_layers, model.d_model) == ("hf", 3, 32)
    ids = torch.tensor([tok(s)["input_ids"][:40] for s in SENTENCES[2:]])
    layers = list(range(model.n_layers))
    res = model.residuals(ids, layers)
    with torch.no_grad():
        want = reference(ids, output_hidden_states=True)
        got = model.model(ids)
    # loaded without its output head: the residual stream is all extraction reads
    assert not hasattr(model.model, "lm_head")
    assert (sum(p.numel() for p in model.model.parameters())
            == sum(p.numel() for p in reference.model.parameters()))
    # float32 weights written and read back bit for bit; the same kernels run on both sides
    torch.testing.assert_close(got.last_hidden_state, want.hidden_states[-1], rtol=0,
                               atol=1e-6)
    for layer in layers[:-1]:
        torch.testing.assert_close(res[layer], want.hidden_states[layer + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(reference.model.norm(res[layers[-1]]), want.hidden_states[-1],
                               rtol=0, atol=1e-6)


def test_gguf_embedded_tokenizer_round_trips(tiny_gguf, tmp_path):
    path, _, tok = tiny_gguf
    ref, store = gguf_ref(path), Store(tmp_path / "store")
    entry = outside_tokenizer(ref, store, model_identity(ref, store))
    assert entry.meta == {"bos": True, "vocab_size": len(tok)}
    loaded = load_tokenizer(entry)
    assert loaded.is_fast
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    for text in SENTENCES:
        mine, want = loaded(text, return_offsets_mapping=True), tok(text,
                                                                    return_offsets_mapping=True)
        assert mine["input_ids"] == want["input_ids"], text
        assert mine["offset_mapping"] == want["offset_mapping"], text
        assert loaded.decode(mine["input_ids"]) == tok.decode(want["input_ids"])
        assert loaded.decode(mine["input_ids"][1:]) == text


def test_random_init_keeps_the_architecture_and_is_seeded(tiny_gguf, tmp_path):
    """The no-learning control: the GGUF model's architecture with fresh weights, the same
    for every load (seeded), computing something else than the trained model."""
    from saeuniv.models import random_outside_model

    path, _, tok = tiny_gguf
    ref, store = gguf_ref(path), Store(tmp_path / "store")
    trained = load_outside_model(ref, store, key="trained")
    first, again = (random_outside_model(ref, store, key="random") for _ in range(2))
    assert "random init" in first.name and not hasattr(first.model, "lm_head")
    assert (first.n_layers, first.d_model) == (trained.n_layers, trained.d_model)
    shapes = {n: p.shape for n, p in trained.model.named_parameters()}
    assert {n: p.shape for n, p in first.model.named_parameters()} == shapes
    for (name, p), q in zip(first.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), name
    ids = torch.tensor([tok(s)["input_ids"][:40] for s in SENTENCES[2:]])
    res_random = first.residuals(ids, [1])[1]
    assert torch.equal(res_random, again.residuals(ids, [1])[1])
    assert not torch.allclose(res_random, trained.residuals(ids, [1])[1], atol=1e-3)
