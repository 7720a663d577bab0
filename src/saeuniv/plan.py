"""The disk plan: what the store will hold after a stage, estimated from the config before
any work, so a run that cannot fit stops in seconds.

Models and SAEs are counted by parameters (float32), codes as tokens x layers x active
features per token x 8 bytes (CSR value and index), matches by pairs and top activations.
Entries already in the store count nothing; the corpus, tokenizers and windows are built by
validation itself; outside models' weights live in the Hugging Face cache and are not
counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import stages
from .extract import codes_spec
from .models import member_spec
from .saes import sae_spec

ASSUMED_L0 = 128  # active features per token assumed for an SAE that does not fix it


def n_params(member, vocab: int, context: int) -> int:
    """Parameters of a family member (embeddings, attention, MLP, norms, unembedding)."""
    d, dm = member.d_model, member.d_mlp
    return 2 * vocab * d + vocab + context * d + 2 * d + member.n_layers * (
        4 * d * d + 2 * d * dm + dm + 9 * d)


def planned_model_key(side) -> str:
    """``side.model_key`` without training a family member (its store key)."""
    if not side.family:
        return side.model_key
    return side.store.key("model", member_spec(side.member, side.cfg.family,
                                               side.up.family_tokenizer))


def planned_sae_key(side, layer: int) -> str:
    """``side.sae_keys[layer]`` without training the SAE (its store key)."""
    if not side.trained_saes:
        return side.sae_keys[layer]
    return side.store.key("sae", sae_spec(planned_model_key(side), layer, side.cfg.sae,
                                          side.sae_windows_key))


def sae_shape(side, layer: int) -> tuple[int | None, int]:
    """(width, active features per token) of the side's SAE at ``layer``, as far as known
    without loading it (a release's width is not)."""
    ref, d_model = side.sae_ref, side.info.d_model
    if ref.source == "train":
        s = side.cfg.sae
        d_sae = s.expansion * d_model
        return d_sae, s.topk if s.architecture == "topk" else min(d_sae, ASSUMED_L0)
    if ref.source == "folder":
        cfg = json.loads((Path(ref.folder(layer)).expanduser() / "cfg.json").read_text())
        d_sae = cfg.get("d_sae") or None
        k = cfg.get("k") if cfg.get("architecture") == "topk" else None
        return d_sae, int(k or min(d_sae or ASSUMED_L0, ASSUMED_L0))
    return None, ASSUMED_L0


def _models(pipe) -> tuple[int, str]:
    fam, vocab = pipe.cfg.family, pipe.cfg.tokenizer.vocab_size
    todo = {s.member.name: s.member for s in pipe.sides if s.family
            and not pipe.store.has("model", member_spec(s.member, fam,
                                                        pipe.up.family_tokenizer))}
    return (sum(4 * n_params(m, vocab, fam.context) for m in todo.values()),
            f"{len(todo)} family model(s) to train, float32 weights")


def _saes(pipe, shapes: dict) -> tuple[int, str]:
    n, total = 0, 0
    for (side, layer), (d_sae, _) in shapes.items():
        d = side.info.d_model
        if side.trained_saes and not pipe.store.has("sae", sae_spec(
                planned_model_key(side), layer, pipe.cfg.sae, side.sae_windows_key)):
            n, total = n + 1, total + 4 * (2 * d * d_sae + 2 * d_sae + d)
    return total, f"{n} SAE(s) to train, float32 encoder and decoder"


def _codes(pipe, shapes: dict) -> tuple[int, str]:
    windows = pipe.up.windows_entry
    rows = windows.meta["n_valid_tokens"]
    sizes = []
    for (side, layer), (_, l0) in shapes.items():
        spec = codes_spec(planned_model_key(side), layer, planned_sae_key(side, layer),
                          windows, side.windows_side)
        if not pipe.store.has("codes", spec):
            sizes.append((8 * l0 + 4) * rows)  # CSR: float32 value + int32 index
    # the layer being finished holds its shards and its matrix at once
    return (sum(sizes) + max(sizes, default=0),
            f"{len(sizes)} layer(s) x {rows:,} tokens x the SAE's active features per token "
            f"(TopK's k, else at most {ASSUMED_L0}) x 8 bytes")


def _matches(pipe, shapes: dict) -> tuple[int, str]:
    total = 0
    for la, lb in pipe.pairs:
        da, db = shapes[(pipe.a, la)][0], shapes[(pipe.b, lb)][0]
        if da and db:  # pairs (two int64 indices, a float32) and top activations
            total += 20 * min(da, db) + 12 * pipe.cfg.match.top_k * (da + db)
    return total, f"{len(pipe.pairs)} layer pair(s)"


def planned_bytes(pipe, stage: str = "run") -> dict[str, tuple[int, str]]:
    """Estimated bytes the store still needs for ``stage`` and the stages before it
    (``run``: every stage), by kind, each with how it is estimated."""
    kinds = {kind for s in stages.upto(stage) for kind in s.kinds}
    shapes = {(side, layer): sae_shape(side, layer) for side in pipe.sides
              for layer in side.used_layers}
    plan: dict[str, tuple[int, str]] = {}
    if "model" in kinds:
        plan["models"] = _models(pipe)
    if "sae" in kinds:
        plan["saes"] = _saes(pipe, shapes)
    if "codes" in kinds:
        plan["codes"] = _codes(pipe, shapes)
    if "matches" in kinds:
        plan["matches"] = _matches(pipe, shapes)
    return plan
