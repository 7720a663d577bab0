"""Comparing matchers on one layer pair (``match.compare``): does a conclusion survive the
choice of matcher, and what happens to features with no single partner?

The ``matchers`` store entry of a layer pair holds the pairs of each matcher of
``MATCHERS`` (``pairs_<matcher>.npz``), all under the config's threshold and token filters:

- ``correlation``: the config's policy on the code correlations (``one_to_one`` when the
  config's policy is ``sinkhorn``);
- ``decoder``: the same policy on the cosine of A's decoder rows, stitched into B's
  residual space, with B's;
- ``transport``: the ``sinkhorn`` policy on the code correlations;
- ``vocab`` (only when both models share a tokenizer): the same policy as ``correlation``
  on the cosine of the two features' effects on the next-token logits, each decoder row
  through its own model's unembedding (``saeuniv.unembed``): data-free. No pairs, and a
  ``vocab_missing`` note in the meta, where a side's head cannot be read.

and, in its meta: the stitch's R² (fitted and held out), the Jaccard overlap of every two
matchers' pairs, the fan-out of A's and B's features at ``match.split_threshold``
(histogram and the share of features with a partner that have two or more), the five
largest splits, the medians of co-firing, IoU and latent scaling over the correlation
pairs, and the cross-reconstruction of B's activations by B's SAE on A's held-out
residual vectors (raw and through the stitch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import residuals
from .core import matching
from .store import Entry

MATCHERS = ("correlation", "decoder", "transport", "vocab")
KIND = "matchers"
N_SPLITS = 5


def stitch(pipe, la: int, lb: int) -> matching.Stitch:
    """The map from A layer ``la``'s residual space to B layer ``lb``'s, fitted on the
    residual vectors of the first ``match.stitch_rows`` compared positions (a seeded fifth
    of them held out, seed 0)."""
    mc = pipe.cfg.match
    x_a = residuals.load(pipe.a.residual_rows[mc.stitch_rows][la])
    x_b = residuals.load(pipe.b.residual_rows[mc.stitch_rows][lb])
    return matching.stitch(x_a, x_b, kind=mc.stitch)


def decoder_cosine(pipe, la: int, lb: int) -> tuple[np.ndarray, matching.Stitch]:
    """The (F_a, F_b) cosine of A's stitched decoder rows with B's, and the stitch."""
    st = stitch(pipe, la, lb)
    return matching.decoder_cosine(pipe.a.decoder(la), pipe.b.decoder(lb), st), st


def names(pipe) -> tuple[str, ...]:
    """The matchers of ``MATCHERS`` that apply to the pipeline's two models: ``vocab``
    needs one shared tokenizer."""
    return tuple(n for n in MATCHERS if n != "vocab" or pipe.up.shared_tokenizer)


def vocab_gram(pipe) -> matching.VocabGram | None:
    """The Gram matrices of the two models' unembeddings (a ``vocab_gram`` store entry,
    one per pair of models); None when a side's head cannot be read."""
    u_a, u_b = pipe.a.unembedding, pipe.b.unembedding
    if u_a is None or u_b is None:
        return None

    def build(out: Path) -> dict:
        g = matching.vocab_gram(u_a, u_b)
        np.savez(out / "gram.npz", ab=g.ab, aa=g.aa, bb=g.bb)
        return {"d_a": g.ab.shape[0], "d_b": g.ab.shape[1], "vocab": u_a.shape[1]}

    e = pipe.store.get_or_create("vocab_gram", {"a": pipe.a.model_key,
                                                "b": pipe.b.model_key}, build)[0]
    with np.load(e.file("gram.npz")) as z:
        return matching.VocabGram(z["ab"], z["aa"], z["bb"])


def spec(pipe, matches: Entry) -> dict:
    mc = pipe.cfg.match
    out = {"matches": matches.key, "stitch": mc.stitch, "stitch_rows": mc.stitch_rows,
           "transport": mc.options("sinkhorn"), "policy": policy(pipe),
           "split_threshold": mc.split_threshold, **pipe.device_key}
    if "vocab" in names(pipe):
        out["vocab"] = True
    return out


def policy(pipe) -> str:
    """The policy of the ``correlation`` and ``decoder`` matchers."""
    p = pipe.cfg.match.policy
    return "one_to_one" if p == "sinkhorn" else p


def entry(pipe, la: int, lb: int, matches: Entry, tokens: tuple) -> Entry:
    """The ``matchers`` entry of a layer pair, built when missing; ``tokens``: the top
    tokens of A's and B's features (``matching.TopTokens``) for the token filters."""
    return pipe.store.get_or_create(KIND, spec(pipe, matches),
                                    lambda out: build(pipe, la, lb, tokens, out))[0]


def load(e: Entry) -> dict[str, matching.Matches]:
    """The pairs of every matcher stored in a ``matchers`` entry."""
    out = {}
    for name in MATCHERS:
        if not e.file(f"pairs_{name}.npz").exists():
            continue
        with np.load(e.file(f"pairs_{name}.npz")) as z:
            out[name] = matching.Matches(z["a"], z["b"], z["corr"])
    return out


def pair_sets(pipe, corr, cos, tokens, vocab=None) -> dict[str, matching.Matches]:
    """The pairs of each matcher, under the config's threshold and token filters;
    ``vocab``: the vocabulary-effect cosine (None: no ``vocab`` matcher)."""
    mc = pipe.cfg.match
    rule = mc.rule()
    same = matching.Rule(policy(pipe), rule.threshold, rule.junk_filter, rule.shared_token)
    ot = matching.Rule("sinkhorn", rule.threshold, rule.junk_filter, rule.shared_token)
    out = {"correlation": matching.pair(corr, same, *tokens).matches,
           "decoder": matching.pair(cos, same, *tokens).matches,
           "transport": matching.pair(corr, ot, *tokens, **mc.options("sinkhorn")).matches}
    if vocab is not None:
        out["vocab"] = matching.pair(vocab, same, *tokens).matches
    return out


def vocab_cosine(pipe, la: int, lb: int) -> tuple[np.ndarray | None, dict]:
    """The (F_a, F_b) vocabulary-effect cosine of the two layers' features (None when it
    does not apply), and what the meta says of it."""
    if "vocab" not in names(pipe):
        return None, {}
    gram = vocab_gram(pipe)
    if gram is None:
        return None, {"vocab_missing": "a side's output head cannot be read (an untied "
                                       "head of a randomly initialised model)"}
    return matching.vocab_cosine_gram(pipe.a.decoder(la), pipe.b.decoder(lb), gram), {}


def fan_out_stats(corr, threshold: float) -> dict:
    fo = matching.fan_out(corr, threshold)
    return {"split_share_a": fo.split_share_a, "split_share_b": fo.split_share_b,
            "fan_out_a": fo.histogram("a"), "fan_out_b": fo.histogram("b"),
            "mean_fan_out_a": float(fo.a[fo.a >= 1].mean()) if (fo.a >= 1).any() else None,
            "splits": matching.top_splits(corr, threshold, N_SPLITS)}


def pair_stats(codes_a, codes_b, m: matching.Matches) -> dict:
    if not m.n:
        return {}
    stats = {**matching.cofiring(codes_a, codes_b, m),
             **matching.latent_scaling(codes_a, codes_b, m)}
    names = {"cofire": "cofire", "iou": "iou", "beta": "latent_beta",
             "explained": "latent_explained"}
    return {names[k]: float(np.nanmedian(v)) for k, v in stats.items()
            if np.isfinite(v).any()}


def cross_reconstruction(pipe, la: int, lb: int, st: matching.Stitch) -> dict:
    """B's SAE on A's held-out residual rows, raw and through the stitch."""
    rows = pipe.cfg.match.stitch_rows
    x_a = residuals.load(pipe.a.residual_rows[rows][la])[st.heldout]
    x_b = residuals.load(pipe.b.residual_rows[rows][lb])[st.heldout]
    r = matching.cross_reconstruction(x_a, x_b, lambda x: pipe.b.reconstruct(lb, x), st)
    return {"xrecon_own": r.own, "xrecon_stitch": r.stitch, "xrecon_raw": r.raw,
            "xrecon_aligned": r.aligned}


def plain(x):
    """JSON-ready: numpy numbers as Python numbers, NaN as None, recursively."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    return x.item() if isinstance(x, np.integer) else x


def build(pipe, la: int, lb: int, tokens: tuple, out: Path) -> dict:
    mc = pipe.cfg.match
    codes_a = pipe.analysis_codes(pipe.a.codes[la])
    codes_b = pipe.analysis_codes(pipe.b.codes[lb])
    corr = matching.correlation(codes_a, codes_b, device=pipe.device)
    cos, st = decoder_cosine(pipe, la, lb)
    vocab, note = vocab_cosine(pipe, la, lb)
    sets = pair_sets(pipe, corr, cos, tokens, vocab)
    for name, m in sets.items():
        np.savez(out / f"pairs_{name}.npz", a=m.a, b=m.b, corr=m.corr)
    meta = {**note, "stitch_r2_fit": st.r2_fit, "stitch_r2": st.r2_heldout,
            **{f"n_pairs_{k}": m.n for k, m in sets.items()},
            **{f"jaccard_{k}": v for k, v in matching.agreement(sets).items()},
            **fan_out_stats(corr, mc.split_threshold),
            **pair_stats(codes_a, codes_b, sets["correlation"]),
            **cross_reconstruction(pipe, la, lb, st)}
    return plain(meta)
