"""The folded unembedding (``saeuniv.unembed``) against the models' own forward pass: for a
direction ``v`` that leaves the final norm's scale unchanged at ``x``, the derivative of the
logits along ``v`` is ``v @ unembedding / scale``. Checked by autograd on a transformer-lens
model with a LayerNorm and on a GGUF llama with an RMSNorm and an untied head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeuniv.config import load_config
from saeuniv.models import load_outside_model, random_outside_model
from saeuniv.store import Store
from saeuniv.unembed import unembedding

from gguf_files import reference_model, reference_tokenizer, write_gguf


def assert_logit_derivative(head, x: torch.Tensor, w_u: np.ndarray, centre: bool) -> None:
    """``head``: residual (d,) -> logits (V,). For directions that keep the norm's scale
    (orthogonal to the centred ``x``), J v is ``v @ w_u`` times one constant 1/scale."""
    rng = np.random.default_rng(0)
    xc = (x - x.mean()) if centre else x
    ratios = []
    for _ in range(4):
        v = torch.as_tensor(rng.normal(size=x.shape[0]), dtype=torch.float32)
        v = v - (v @ xc) / (xc @ xc) * xc  # no change of the norm's scale at x
        _, jv = torch.func.jvp(head, (x,), (v,))
        want = v.numpy().astype(np.float64) @ w_u.astype(np.float64)
        got = jv.detach().numpy().astype(np.float64)
        ratio = (got @ want) / (want @ want)
        np.testing.assert_allclose(got, ratio * want, atol=1e-4 * np.abs(got).max())
        ratios.append(ratio)
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)  # one scale: 1/sigma(x)
    assert ratios[0] > 0


def test_transformer_lens_layernorm_is_folded_and_centred():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saeuniv.models import LoadedModel

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", device="cpu")
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        model.ln_final.w.uniform_(0.5, 1.5)
        model.W_U.normal_()
    w_u = unembedding(LoadedModel("tiny", model, 1, 16, "k"))
    assert w_u.shape == (16, 40) and w_u.dtype == np.float32
    np.testing.assert_allclose(w_u.mean(0), 0, atol=1e-5)  # a LayerNorm removes the mean

    def head(x):
        return model.unembed(model.ln_final(x[None, None]))[0, 0]

    x = torch.randn(16) * 3 + 1
    assert_logit_derivative(head, x, w_u, centre=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tok = reference_tokenizer()
    model = reference_model(tok)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf", model, tok)
    return path, model


def gguf_ref(path):
    return load_config("tiny", {"model_a": {"source": "gguf", "name": "tiny-llama",
                                            "path": str(path), "device": "cpu"}}).model_a


def test_gguf_untied_head_is_read_from_the_file_with_the_rmsnorm_gain(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    ref, store = gguf_ref(path), Store(tmp_path / "store")
    loaded = load_outside_model(ref, store, key="k")
    assert not hasattr(loaded.model, "lm_head")  # loaded without its head
    w_u = unembedding(loaded, ref, store)
    d, vocab = reference.config.hidden_size, reference.config.vocab_size
    assert w_u.shape == (d, vocab)
    norm, lm_head = reference.model.norm, reference.lm_head

    def head(x):
        return lm_head(norm(x[None]))[0]

    x = torch.randn(d) * 2
    assert_logit_derivative(head, x, w_u, centre=False)
    # the gain is folded: without it the derivative would not be proportional
    plain = lm_head.weight.detach().numpy().T
    assert not np.allclose(w_u, plain * (w_u[0, 0] / plain[0, 0]), atol=1e-3)


def test_random_init_with_an_untied_head_has_no_unembedding(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    ref, store = gguf_ref(path), Store(tmp_path / "store")
    loaded = random_outside_model(ref, store, key="r")
    assert unembedding(loaded, ref, store, random_init=True) is None
