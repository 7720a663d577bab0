"""Pair the SAE features of two models by correlating their codes on shared tokens.

Pure core: sparse codes in, arrays out; no I/O. Importing it does not import torch: only
top-k lists with ``k > 1`` (:func:`topk_correlation`, :func:`dense_topk`) load it.

1. :mod:`.correlation`: :func:`correlation` (or :class:`CorrelationAccumulator`, fed
   shard by shard) gives the exact Pearson correlation of every A feature with every B
   feature; :func:`topk_correlation` gives only each feature's best partners
   (:class:`TopK`) when the full matrix does not fit in memory.
2. :mod:`.activations`: :func:`top_activations` finds each feature's top activations,
   and :func:`top_tokens` their token ids, texts and junk flags (:class:`TopTokens`,
   junk tokens from :func:`junk_ids`).
3. :mod:`.pairing`: :func:`pair` applies a :class:`Rule` (policy, correlation
   threshold, junk-token filter, shared-token filter) and returns the pairs with the
   number left after each step (:class:`Pairing`); :func:`match` is the policy and the
   threshold alone.

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
from .correlation import (
    DEFAULT_MAX_BYTES,
    CorrelationAccumulator,
    TopK,
    correlation,
    dead_features,
    dense_topk,
    topk_correlation,
)
from .pairing import POLICIES, Matches, Pairing, Rule, match, pair

__all__ = [
    "DEFAULT_MAX_BYTES",
    "JUNK_TEXTS",
    "POLICIES",
    "CorrelationAccumulator",
    "Matches",
    "Pairing",
    "Rule",
    "TopActivations",
    "TopK",
    "TopTokens",
    "correlation",
    "dead_features",
    "dense_topk",
    "junk_filter",
    "junk_ids",
    "match",
    "pair",
    "shared_token_filter",
    "shares_text",
    "top_activations",
    "top_tokens",
    "topk_correlation",
]
