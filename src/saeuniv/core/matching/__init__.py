"""Pair the SAE features of two models by correlating their codes on shared tokens.

Pure core: sparse codes in, arrays out; no I/O. Importing it does not import torch: only
top-k lists with ``k > 1`` (:func:`topk_correlation`, :func:`dense_topk`) and the correlation
on a torch ``device`` (:mod:`.torch_corr`, see :mod:`.correlation`) load it.

1. :mod:`.correlation`: :func:`correlation` (or :class:`CorrelationAccumulator`, fed
   shard by shard) gives the exact Pearson correlation of every A feature with every B
   feature; :mod:`.topk`: :func:`topk_correlation` gives only each feature's best
   partners (:class:`TopK`) when the full matrix does not fit in memory.
2. :mod:`.activations`: :func:`top_activations` finds each feature's top activations,
   and :func:`top_tokens` their token ids, texts and junk flags (:class:`TopTokens`,
   junk tokens from :func:`junk_ids`).
3. :mod:`.pairing`: :func:`pair` applies a :class:`Rule` (policy, correlation
   threshold, junk-token filter, shared-token filter) and returns the pairs with the
   number left after each step (:class:`Pairing`); :func:`match` is the policy and the
   threshold alone. Policies other than correlation's own: ``hungarian`` (assignment)
   and ``sinkhorn`` (:mod:`.transport`, entropic optimal transport through POT).
4. Beyond co-activation: :mod:`.stitch` fits a map between the residual spaces
   (:func:`stitch`); :mod:`.weights` scores features from their weights
   (:func:`decoder_cosine`, :func:`vocab_cosine`), a matrix :func:`match` takes like a
   correlation matrix.
5. Reading the pairs: :mod:`.fanout` counts the partners of each feature (:func:`fan_out`,
   :func:`top_splits`: a feature split across scale); :mod:`.agreement` compares the
   pair sets of matchers (:func:`jaccard`); :mod:`.pairstats` gives crosscoder-style
   statistics of matched pairs (:func:`cofiring`, :func:`latent_scaling`,
   :func:`cross_reconstruction`).

Dead features (zero variance over the tokens) have NaN correlations and are never
matched.
"""

from .activations import (
    JUNK_TEXTS,
    TopActivations,
    TopTokens,
    junk_filter,
    junk_ids,
    shared_token_filter,
    shares_text,
    top_activations,
    top_tokens,
)
from .agreement import agreement, jaccard
from .correlation import DEFAULT_MAX_BYTES, CorrelationAccumulator, correlation, dead_features
from .fanout import FanOut, fan_out, top_splits
from .pairing import POLICIES, Matches, Pairing, Rule, match, pair
from .pairstats import CrossReconstruction, cofiring, cross_reconstruction, latent_scaling
from .stitch import KINDS as STITCH_KINDS
from .stitch import Stitch, stitch
from .topk import TopK, dense_topk, topk_correlation
from .transport import sinkhorn_pairs
from .weights import VocabGram, decoder_cosine, vocab_cosine, vocab_cosine_gram, vocab_gram

__all__ = [
    "DEFAULT_MAX_BYTES",
    "JUNK_TEXTS",
    "POLICIES",
    "CorrelationAccumulator",
    "CrossReconstruction",
    "FanOut",
    "Matches",
    "Pairing",
    "Rule",
    "STITCH_KINDS",
    "Stitch",
    "TopActivations",
    "TopK",
    "TopTokens",
    "agreement",
    "cofiring",
    "correlation",
    "cross_reconstruction",
    "dead_features",
    "decoder_cosine",
    "dense_topk",
    "fan_out",
    "jaccard",
    "junk_filter",
    "junk_ids",
    "latent_scaling",
    "match",
    "pair",
    "shared_token_filter",
    "shares_text",
    "sinkhorn_pairs",
    "stitch",
    "top_activations",
    "top_splits",
    "top_tokens",
    "topk_correlation",
    "vocab_cosine",
    "vocab_cosine_gram",
    "vocab_gram",
    "VocabGram",
]
