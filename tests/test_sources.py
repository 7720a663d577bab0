"""Outside models and SAEs: local Hugging Face folders, sae-lens folders, releases,
the resid_post / hidden_states[L+1] correspondence, and clear errors for mismatches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from saeuniv import cli
from saeuniv.config import load_config
from saeuniv.extract import load_codes
from saeuniv.models import ModelError, hf_blocks, load_outside_model
from saeuniv.pipeline import Pipeline
from saeuniv.saes import SAEError
from saeuniv.sides import Side
from saeuniv.stages import match, similarity
from saeuniv.store import Store

from helpers import bpe_tokenizer, private_runs


def _tokenizer(folder, vocab_size: int, bos: bool):
    fast = bpe_tokenizer(vocab_size, bos)
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Two tiny random HF causal LMs with different tokenizers: a Llama that reads BOS
    (3 blocks x 32) and a GPT-2 that does not (2 blocks x 24)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = root / "llama"
    tok = _tokenizer(llama, 400, bos=True)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(str(llama))
    gpt2 = root / "gpt2"
    tok = _tokenizer(gpt2, 300, bos=False)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=2, n_head=4,
                               n_positions=64)).save_pretrained(str(gpt2))
    return {"llama": llama, "gpt2": gpt2}


def _hf_config(hf_folders, corpus_dir, **extra):
    overrides = {
        "model_a": {"source": "hf", "name": "tiny-llama", "path": str(hf_folders["llama"])},
        "model_b": {"source": "hf", "name": "tiny-gpt2", "path": str(hf_folders["gpt2"])},
        "corpus.source": str(corpus_dir),
    }
    overrides.update(extra)
    return load_config("tiny", overrides)


def test_hf_hook_reads_hidden_states_l_plus_1(hf_folders, tmp_path):
    cfg = _hf_config(hf_folders, "unused")
    model = load_outside_model(cfg.model_a, Store(tmp_path), key="k")
    assert (model.backend, model.n_layers, model.d_model) == ("hf", 3, 32)
    toks = torch.randint(3, 300, (2, 10))
    res = model.residuals(toks, [0, 1, 2])
    with torch.no_grad():
        states = model.model(toks, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        torch.testing.assert_close(res[layer], states[layer + 1])
    # the last entry of hidden_states is after the final norm; the hook is before it
    base, _ = hf_blocks(model.model)
    torch.testing.assert_close(base.norm(res[2]), states[3])
    assert not torch.allclose(res[2], states[3])


def test_hf_forward_stops_at_the_deepest_layer(hf_folders, tmp_path):
    model = load_outside_model(_hf_config(hf_folders, "x").model_a, Store(tmp_path), key="k")
    _, blocks = hf_blocks(model.model)
    seen = []
    handle = blocks[2].register_forward_hook(lambda *a: seen.append(2))
    try:
        model.residuals(torch.randint(3, 300, (1, 6)), [0, 1])
    finally:
        handle.remove()
    assert seen == []


def test_transformer_lens_hook_agrees_with_hf_hidden_states():
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4,
                                    n_positions=32)).eval()
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=128,
                                  d_vocab=100, n_ctx=32, act_fn="gelu_new",
                                  normalization_type="LN", device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    toks = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        states = hf(toks, output_hidden_states=True).hidden_states
        _, cache = tl.run_with_cache(toks)
    for layer in range(2):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], states[layer + 1],
                                   atol=1e-4, rtol=1e-4)
    # hidden_states[L] is resid_post of L - 1, not of L: the off-by-one this pins
    assert not torch.allclose(cache["blocks.1.hook_resid_post"], states[1], atol=1e-2)


@pytest.fixture(scope="module")
def hf_run(hf_folders, corpus_dir, tmp_path_factory):
    """One `saeuniv run` on the two tiny HF folders (two tokenizers), into a private store
    and MLflow database (its artefacts under the same folder)."""
    root = tmp_path_factory.mktemp("hfrun")
    args = ["run", "--config", "tiny", "--set", f"corpus.source={corpus_dir}",
            "--set", f"model_a={{source: hf, name: tiny-llama, path: {hf_folders['llama']}}}",
            "--set", f"model_b={{source: hf, name: tiny-gpt2, path: {hf_folders['gpt2']}}}",
            "--set", "extract.n_tokens=800"]
    with private_runs(root, chdir=True):
        assert cli.main(args) == 0
    cfg = _hf_config(hf_folders, corpus_dir, **{"extract.n_tokens": 800})
    return {"root": root, "cfg": cfg, "store": Store(root / "store")}


def test_two_tokenizers_are_compared_on_shared_boundaries(hf_run):
    pipe = Pipeline(hf_run["cfg"], hf_run["store"])
    assert not pipe.up.shared_tokenizer
    assert pipe.a.bos and not pipe.b.bos
    wa, wb = pipe.a.windows, pipe.b.windows
    assert (wa.tokens[:, 0] == wa.bos_id).all() and wb.bos_id is None
    assert not wb.mask[:, 0].any()  # no BOS: the first position is never compared
    ends_a = wa.offsets[wa.mask][:, 1]
    ends_b = wb.offsets[wb.mask][:, 1]
    np.testing.assert_array_equal(ends_a, ends_b)  # row i of A and of B end together
    np.testing.assert_array_equal(np.argwhere(wa.mask)[:, 0], np.argwhere(wb.mask)[:, 0])
    n = int(wa.mask.sum())
    assert n >= 800
    assert n < (wa.offsets[:, :, 1] > wa.offsets[:, :, 0]).sum()  # some tokens not shared
    for side in pipe.sides:
        for _layer, entry in side.codes.items():
            assert load_codes(entry).shape[0] == n
    # each layer pair's scores: its own layers, the pairs its matching kept, and a score
    # against its null wherever enough pairs were kept
    sim = pipe.cfg.similarity
    assert sorted(pipe.pairs) == [(la, lb) for la in range(3) for lb in range(2)]
    n_ok = 0
    for la, lb in pipe.pairs:
        s = similarity.load(similarity.entry(pipe, la, lb))
        assert (s["layer_a"], s["layer_b"]) == (la, lb)
        assert s["n_pairs"] == len(match.load(match.entry(pipe, la, lb)).a)
        assert (s["status"] == "ok") == (s["n_pairs"] >= sim.min_pairs), s["status"]
        if s["status"] == "ok":
            n_ok += 1
            assert set(s["metrics"]) == set(sim.metrics)
            for r in s["metrics"].values():
                if "error" not in r:
                    assert np.isfinite(r["observed"]) and 1 / (sim.n_perm + 1) <= r["p"] <= 1
    assert n_ok >= 1


def test_sae_folder_source_gives_the_same_codes(hf_run, tmp_path):
    pipe = Pipeline(hf_run["cfg"], hf_run["store"])
    for layer in pipe.a.layers:
        shutil.copytree(pipe.a.sae_entries[layer].path / "sae", tmp_path / f"layer_{layer}")
    cfg = hf_run["cfg"].replace(**{"sae_a": {"source": "folder",
                                             "path": str(tmp_path / "layer_{layer}")}})
    own = shutil.copytree(hf_run["root"] / "store", tmp_path / "store",
                          ignore=shutil.ignore_patterns("*.lock"))
    other = Pipeline(cfg, Store(own))  # new codes go into a copy of the shared store
    other.validate()
    assert other.a.sae_keys[1] != pipe.a.sae_keys[1]
    fresh = other.a.codes[1]
    assert fresh.key != pipe.a.codes[1].key
    assert (load_codes(fresh) != load_codes(pipe.a.codes[1])).nnz == 0


def _folder_sae(hf_run, tmp_path, d_in=None, hook=None):
    pipe = Pipeline(hf_run["cfg"], hf_run["store"])
    for layer in pipe.a.layers:
        dest = tmp_path / f"layer_{layer}"
        shutil.copytree(pipe.a.sae_entries[layer].path / "sae", dest)
        cfg = json.loads((dest / "cfg.json").read_text())
        if d_in is not None:
            cfg["d_in"] = d_in
        if hook is not None:
            cfg["metadata"]["hook_name"] = hook
        (dest / "cfg.json").write_text(json.dumps(cfg))
    return {"source": "folder", "path": str(tmp_path / "layer_{layer}")}


@pytest.mark.parametrize("case, message", [
    ("width", r"SAE d_in=99 but 'tiny-llama' has d_model=32; use an SAE trained on this model"),
    ("layer", r"SAE reads 'blocks.0.hook_resid_post' but layer 1 is "
              r"'blocks.1.hook_resid_post'; pick the SAE of that layer"),
    ("missing", r"layer_\{layer\}/cfg.json does not exist|cfg.json does not exist"),
    ("release", r"sae-lens has no release 'gemma-scope-2b-pt-res-canonicl'; did you mean"),
    ("release_id", r"release 'gemma-scope-2b-pt-res-canonical' has no SAE id "
                   r"'layer_1/width_1m/canonical' \(layer 1\)"),
])
def test_mismatched_saes_are_rejected_before_any_model_runs(hf_run, tmp_path, case, message,
                                                           monkeypatch):
    ref = {
        "width": lambda: _folder_sae(hf_run, tmp_path, d_in=99),
        "layer": lambda: _folder_sae(hf_run, tmp_path, hook="blocks.0.hook_resid_post"),
        "missing": lambda: {"source": "folder", "path": str(tmp_path / "none_{layer}")},
        "release": lambda: {"source": "release", "release": "gemma-scope-2b-pt-res-canonicl",
                            "id": "layer_{layer}/width_16k/canonical"},
        "release_id": lambda: {"source": "release",
                               "release": "gemma-scope-2b-pt-res-canonical",
                               "id": "layer_{layer}/width_1m/canonical"},
    }[case]()
    layers = [1] if case in ("layer", "release_id") else "all"
    cfg = hf_run["cfg"].replace(**{"sae_a": ref, "layers_a": layers})
    pipe = Pipeline(cfg, hf_run["store"])
    monkeypatch.setattr(Side, "model", property(lambda *a: pytest.fail("a model was loaded")))
    with pytest.raises(SAEError, match=message):
        pipe.validate()


def test_missing_model_folder_is_a_clear_error(tmp_path, corpus_dir):
    cfg = load_config("tiny", {"model_a": {"source": "hf", "path": str(tmp_path / "nowhere")},
                               "corpus.source": str(corpus_dir)})
    with pytest.raises(ModelError, match=r"model folder .*nowhere' does not exist"):
        Pipeline(cfg, Store(tmp_path / "s")).validate()


def test_cli_reports_a_mismatched_sae_in_one_line(hf_run, tmp_path, capsys, tracking):
    ref = _folder_sae(hf_run, tmp_path, d_in=99)
    code = cli.main(["run", "--config", "tiny", "--store", str(hf_run["root"] / "store"),
                     "--set", f"corpus.source={hf_run['cfg'].corpus.source}",
                     "--set", f"model_a={{source: hf, name: tiny-llama, "
                              f"path: {hf_run['cfg'].model_a.path}}}",
                     "--set", f"sae_a={{source: folder, path: '{ref['path']}'}}"])
    assert code == 2
    assert "SAE d_in=99 but 'tiny-llama' has d_model=32" in capsys.readouterr().err


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face Hub cache holding a tiny `EleutherAI/pythia-70m-deduped` and a tiny
    `pythia-70m-deduped-res-sm` SAE release, so the online code paths (transformer-lens
    official names, ``SAE.from_pretrained``) run offline against it."""
    import huggingface_hub.constants as hub_constants
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def snapshot(repo):
        d = cache / f"models--{repo.replace('/', '--')}"
        (d / "refs").mkdir(parents=True)
        (d / "refs" / "main").write_text("0" * 40)
        snap = d / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        return snap

    snap = snapshot("EleutherAI/pythia-70m-deduped")
    tok = _tokenizer(snap, 300, bos=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(snap))
    snap = snapshot("ctigges/pythia-70m-deduped__res-sm_processed")
    for layer in (0, 1):
        sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae.save_model(str(snap / f"{layer}-res-sm"))
    return cache


def test_official_model_and_release_sae_through_the_hub_cache(hub_cache, tmp_path, corpus_dir):
    from transformers import AutoModelForCausalLM

    cfg = load_config("tiny", {
        "model_a": {"source": "transformer_lens", "name": "pythia-70m-deduped"},
        "sae_a": {"source": "release", "release": "pythia-70m-deduped-res-sm",
                  "id": "blocks.{layer}.hook_resid_post"},
        "corpus.source": str(corpus_dir)})
    pipe = Pipeline(cfg, Store(tmp_path / "store"))
    pipe.validate()
    assert (pipe.a.info.n_layers, pipe.a.info.d_model) == (2, 32)
    sae = pipe.a.saes[1]
    assert sae.cfg.d_in == 32
    model = pipe.a.model
    assert model.backend == "tl"
    # transformer-lens without processing reads the same stream as HF hidden_states[L + 1]
    hf = AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-70m-deduped").eval()
    toks = torch.as_tensor(pipe.a.windows.tokens[:2], dtype=torch.long)
    with torch.no_grad():
        states = hf(toks, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.residuals(toks, [0])[0], states[1], atol=1e-4, rtol=1e-4)
    codes = pipe.a.codes
    assert sorted(codes) == [0, 1]
    assert load_codes(codes[1]).shape == (int(pipe.a.windows.mask.sum()), 64)
