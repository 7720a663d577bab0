"""Model and SAE shapes for the cost plan, read without downloading anything.

A model's shape comes from the built-in family's config, from the table below (the models
of the ready configs that transformer-lens cannot describe offline: GGUF files fetched at
first use, and names whose transformer-lens config needs the Hugging Face Hub), or from
transformer-lens's own offline tables (``get_pretrained_model_config``: Gemma, among others).
An SAE's width and active features per token come from the ``sae`` section (trained here),
a local folder's ``cfg.json``, or the sae-lens release directory shipped with sae-lens
(the width in the SAE's id or path, ``width_16k``; the L0 from ``average_l0_105`` or the
release's expected L0), completed by the table below for releases that name neither.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# non-embedding weights: the attention and MLP matrices of every block, from each model's
# config.json (layers, width, heads, key-value heads, head size, MLP width), as
# transformer-lens counts them
KNOWN_MODELS = {
    # name: (n_layers, d_model, non-embedding parameters)
    "Qwen2.5-Coder-0.5B-Instruct": (24, 896, 357_826_560),
    "Qwen2.5-Coder-1.5B-Instruct": (28, 1536, 1_310_195_712),
    "SmolLM2-135M-Instruct": (30, 576, 106_168_320),
    "gemma-3-270m": (18, 640, 100_270_080),
    "gpt2": (12, 768, 84_934_656),
    "gpt2-medium": (24, 1024, 301_989_888),
    "pythia-70m-deduped": (6, 512, 18_874_368),
    "pythia-160m-deduped": (12, 768, 84_934_656),
    "pythia-410m-deduped": (24, 1024, 301_989_888),
}
KNOWN_SAES = {
    # release: (width, active features per token; 0 when unknown)
    "gpt2-small-res-jb": (24_576, 0),
    "pythia-70m-deduped-res-sm": (32_768, 0),
}
ASSUMED_L0 = 128  # active features per token of an SAE that states none


class ShapeError(ValueError):
    """A shape the plan needs cannot be known without a download."""


@dataclass(frozen=True)
class ModelShape:
    """Depth, width and non-embedding parameters of a model, and where they were read."""

    name: str
    n_layers: int
    d_model: int
    n_params: int
    source: str


@dataclass(frozen=True)
class SAEShape:
    """Width and active features per token of one SAE, and where they were read."""

    d_sae: int
    l0: int
    source: str


def family_params(member) -> int:
    """Non-embedding weights of a built-in family member (attention and MLP matrices)."""
    d, dm = member.d_model, member.d_mlp
    return member.n_layers * (4 * d * d + 2 * d * dm)


def _transformer_lens(name: str) -> ModelShape | None:
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    try:
        cfg = get_pretrained_model_config(name)
    except Exception:  # the Hub is needed for this name: not offline
        return None
    return ModelShape(name, cfg.n_layers, cfg.d_model, int(cfg.n_params), "transformer-lens")


def model_shape(ref, cfg) -> ModelShape:
    """The shape of ``ref`` (a ``ModelRef``) in config ``cfg``, without a download."""
    if ref.source == "family":
        member = next(m for m in cfg.family.members if m.name == ref.name)
        return ModelShape(ref.name, member.n_layers, member.d_model, family_params(member),
                          "family")
    name = ref.name or Path(ref.path).name
    for key in (name, name.split("/")[-1]):
        if key in KNOWN_MODELS:
            return ModelShape(name, *KNOWN_MODELS[key], "saeuniv.shapes")
    shape = _transformer_lens(ref.name) if ref.source == "transformer_lens" else None
    if shape is None:
        raise ShapeError(
            f"the shape of model {name!r} ({ref.source}) is not known offline: add "
            f"(n_layers, d_model, non-embedding parameters) to saeuniv.shapes.KNOWN_MODELS")
    return shape


def _release_shape(release: str, sae_id: str) -> SAEShape:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None or sae_id not in lookup.saes_map:
        raise ShapeError(f"SAE {release}/{sae_id} is not in sae-lens's release directory")
    text = f"{sae_id} {lookup.saes_map[sae_id]}"
    width = re.search(r"width_(\d+)(k?)", text)
    l0 = re.search(r"average_l0_(\d+)", text)
    known_width, known_l0 = KNOWN_SAES.get(release, (0, 0))
    d_sae = (int(width[1]) * (1024 if width[2] else 1)) if width else known_width
    expected = (lookup.expected_l0 or {}).get(sae_id) or 0
    k = int(l0[1]) if l0 else int(expected) or known_l0 or ASSUMED_L0
    if not d_sae:
        raise ShapeError(f"the width of SAE {release}/{sae_id} is not known offline: add it "
                         "to saeuniv.shapes.KNOWN_SAES")
    return SAEShape(d_sae, k, "sae-lens" if (l0 or expected) else f"sae-lens, L0 assumed {k}")


def sae_shape(ref, cfg, d_model: int, layer: int) -> SAEShape:
    """The shape of the SAE of ``ref`` (an ``SAERef``) at ``layer`` of a model ``d_model``
    wide, without a download."""
    if ref.source == "train":
        s = cfg.sae
        d_sae = s.expansion * d_model
        k = s.topk if s.architecture == "topk" else min(d_sae, ASSUMED_L0)
        return SAEShape(d_sae, k, "sae section")
    if ref.source == "folder":
        path = Path(ref.folder(layer)).expanduser() / "cfg.json"
        if not path.exists():
            raise ShapeError(f"SAE folder {path.parent} has no cfg.json")
        c = json.loads(path.read_text())
        d_sae = int(c.get("d_sae") or 0)
        k = int(c.get("k") or 0) if c.get("architecture") == "topk" else 0
        return SAEShape(d_sae, k or min(d_sae, ASSUMED_L0), "cfg.json")
    return _release_shape(ref.release, ref.sae_id(layer))
