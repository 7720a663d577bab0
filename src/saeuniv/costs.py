"""The cost plan of a config: per stage, its tasks, tokens, bytes on disk and in memory,
FLOPs, and the time they take at measured per-operation rates (``saeuniv.rates``).

The plan reads only the config and what the installed packages ship (``saeuniv.shapes``):
nothing is downloaded, loaded or built. Work is counted per unit (a model, an SAE, a layer's
codes, a layer pair), keyed by what it is, so work that two configs share (a ladder's pairs,
the convergence stage's controls) is counted once. What the plan assumes where a number is
only known after the work (how many features are paired, how many directions SVCCA keeps)
is in ``ASSUMPTIONS``; ``benchmarks/plan_check.py`` measures how far off it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import stages
from .controls import floor_config, twin_config
from .core.depth import depth_pairs
from .core.metrics import METRICS
from .core.metrics.inputs import BLOCK_BYTES
from .core.subspaces import svcca_k
from .shapes import model_shape, sae_shape

PAIR_SHARE = 0.125  # features paired per feature of the narrower SAE
SVCCA_SHARE = 0.5  # SVCCA directions kept per paired row (99% of the variance)
CODE_PASSES = 12  # dense passes over a layer pair's correlation matrix (sums, top-k, pairing)
ASSUMPTIONS = (
    f"{PAIR_SHARE:.3g} of the narrower SAE's features end up paired",
    f"SVCCA keeps {SVCCA_SHARE:.2g} of the paired rows as directions",
    "model weights are read from the Hugging Face cache or the store; downloads not counted",
)


@dataclass
class Cost:
    """The work of one unit, or of a stage's units added up.

    ``work`` maps an operation of ``saeuniv.rates.OPS`` to its amount; ``flops`` counts the
    floating-point operations among them (matrix products, models, SAEs).
    """

    tasks: int = 0
    tokens: int = 0
    disk: int = 0
    memory: int = 0
    flops: float = 0.0
    work: dict[str, float] = field(default_factory=dict)

    def add(self, other: Cost) -> None:
        self.tasks += other.tasks
        self.tokens += other.tokens
        self.disk += other.disk
        self.memory = max(self.memory, other.memory)
        self.flops += other.flops
        for op, amount in other.work.items():
            self.work[op] = self.work.get(op, 0.0) + amount

    def seconds(self, rates) -> float:
        """Time of this work at ``rates`` (``rates[op]``: work per second of each operation,
        ``saeuniv.rates``)."""
        return sum(amount / rates[op] for op, amount in self.work.items())


def _flop(op: str, flops: float, **kw) -> Cost:
    return Cost(flops=flops, work={op: flops}, **kw)


class Planner:
    """The units of work of one config, keyed so that another config's equal units merge."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.shapes = {s: model_shape(getattr(cfg, f"model_{s}"), cfg) for s in "ab"}
        self.layers = {s: self._layers(s) for s in "ab"}
        a, b = self.shapes["a"], self.shapes["b"]
        if cfg.pairs == "depth":
            self.pairs = depth_pairs(self.layers["a"], a.n_layers, self.layers["b"], b.n_layers)
        else:
            self.pairs = [(la, lb) for la in self.layers["a"] for lb in self.layers["b"]]
        self.used = {"a": sorted({la for la, _ in self.pairs}),
                     "b": sorted({lb for _, lb in self.pairs})}
        self.saes = {(s, layer): sae_shape(getattr(cfg, f"sae_{s}"), cfg,
                                           self.shapes[s].d_model, layer)
                     for s in "ab" for layer in self.used[s]}

    def _layers(self, side: str) -> list[int]:
        value, n = getattr(self.cfg, f"layers_{side}"), self.shapes[side].n_layers
        if value == "all":
            return list(range(n))
        if isinstance(value, str):
            return list(range(0, n, int(value.split(":")[1])))
        bad = [v for v in value if v >= n]
        if bad:
            raise ValueError(f"layers_{side} {bad} are outside {self.shapes[side].name} "
                             f"({n} layers: 0..{n - 1})")
        return list(value)

    # -- keys: what a unit is, so equal units of two configs merge ------------------------
    def model_key(self, side: str) -> str:
        ref = getattr(self.cfg, f"model_{side}")
        return f"{ref.source}:{ref.name or ref.path}:{ref.init}"

    def sae_key(self, side: str, layer: int) -> str:
        ref, s = getattr(self.cfg, f"sae_{side}"), self.cfg.sae
        how = asdict(s) if ref.source == "train" else {}
        return f"{self.model_key(side)}|{sorted(asdict(ref).items())}|{sorted(how.items())}|{layer}"

    # -- units ---------------------------------------------------------------------------
    def units(self) -> dict[tuple[str, str], Cost]:
        """(stage, unit key) -> its cost, for every unit of every stage but convergence."""
        out: dict[tuple[str, str], Cost] = {}
        for s in "ab":
            out[("models", self.model_key(s))] = self._model(s)
            if getattr(self.cfg, f"sae_{s}").source == "train":
                key = f"{self.model_key(s)}|{self.used[s]}|{self.cfg.sae.train_tokens}"
                out[("saes", "acts " + key)] = self.forward(s, self.cfg.sae.train_tokens)
            for layer in self.used[s]:
                out[("saes", self.sae_key(s, layer))] = self._sae(s, layer)
                out[("extract", self.sae_key(s, layer) + "|codes")] = self._codes(s, layer)
            key = f"{self.model_key(s)}|{self.used[s]}|{self.cfg.extract.n_tokens}|forward"
            out[("extract", key)] = self.forward(s, self.cfg.extract.n_tokens)
        for la, lb in self.pairs:
            pair = f"{self.sae_key('a', la)}~{self.sae_key('b', lb)}"
            out[("match", pair)] = self._match(la, lb)
            out[("similarity", pair + "|" + str(self.cfg.similarity.scoring()))] = \
                self._similarity(la, lb)
        for la, lb in self._subspace_pairs():
            pair = f"{self.sae_key('a', la)}~{self.sae_key('b', lb)}|subspaces"
            out[("subspaces", pair)] = self._subspaces(la, lb)
        return out

    def _subspace_pairs(self):
        if self.cfg.subspaces.pairs == "all":
            return self.pairs
        n_a, n_b = self.shapes["a"].n_layers, self.shapes["b"].n_layers
        nearest = dict(depth_pairs(self.used["a"], n_a, self.used["b"], n_b))
        return [(la, lb) for la, lb in self.pairs if nearest[la] == lb]

    def _model(self, side: str) -> Cost:
        shape, ref = self.shapes[side], getattr(self.cfg, f"model_{side}")
        weights = 4 * shape.n_params
        if ref.source != "family" or ref.init == "random":
            return Cost(tasks=1, memory=weights)
        fam, d = self.cfg.family, shape.d_model
        # the unembedding is as large as the blocks in the built-in family's small models
        params = shape.n_params + d * self.cfg.tokenizer.vocab_size
        flops = 6 * (params + 2 * shape.n_layers * fam.context * d) * fam.train_tokens
        width = max(4 * d, self.cfg.tokenizer.vocab_size)  # the widest product of a step
        op = f"torch:{fam.batch_size * fam.context},{d},{width}"
        return _flop(op, flops, tasks=1, tokens=fam.train_tokens, disk=4 * params,
                     memory=16 * params)  # weights, gradients and Adam's two moments

    def _depth_share(self, side: str) -> float:
        """Share of the model's blocks a forward pass runs: up to the deepest layer used."""
        return (max(self.used[side]) + 1) / self.shapes[side].n_layers

    def _batch_tokens(self) -> int:
        return self.cfg.extract.batch_size * self.cfg.extract.context

    def forward(self, side: str, tokens: int) -> Cost:
        """A forward pass of side ``side``'s model over ``tokens``, up to its deepest layer
        used, in the model's dtype."""
        shape, ctx = self.shapes[side], self.cfg.extract.context
        per_token = 2 * shape.n_params + 4 * shape.n_layers * ctx * shape.d_model
        kind = "torch" if getattr(self.cfg, f"model_{side}").dtype == "float32" else "torch16"
        op = f"{kind}:{self._batch_tokens()},{shape.d_model},{4 * shape.d_model}"
        return _flop(op, per_token * self._depth_share(side) * tokens, tokens=tokens,
                     memory=4 * shape.n_params)

    def _sae(self, side: str, layer: int) -> Cost:
        sae, d = self.saes[(side, layer)], self.shapes[side].d_model
        weights = 4 * (2 * d * sae.d_sae + sae.d_sae + d)
        if getattr(self.cfg, f"sae_{side}").source != "train":
            return Cost(memory=weights)
        s = self.cfg.sae
        acts = 4 * s.train_tokens * d * len(self.used[side])  # every used layer's, cached
        flops = 3 * 2 * 2 * d * sae.d_sae * s.train_tokens  # encoder and decoder, 3 passes
        return _flop(f"torch:{s.batch_tokens},{d},{sae.d_sae}", flops, tasks=1,
                     tokens=s.train_tokens, disk=weights, memory=acts + 4 * weights)

    def _codes(self, side: str, layer: int) -> Cost:
        sae, d, n = self.saes[(side, layer)], self.shapes[side].d_model, self.cfg.extract.n_tokens
        return _flop(f"torch:{self._batch_tokens()},{d},{sae.d_sae}", 2 * d * sae.d_sae * n,
                     tasks=1, tokens=n, disk=(8 * sae.l0 + 4) * n,
                     memory=4 * sae.d_sae * self._batch_tokens())

    def _match(self, la: int, lb: int) -> Cost:
        sa, sb, n = self.saes[("a", la)], self.saes[("b", lb)], self.cfg.extract.n_tokens
        dense = sa.d_sae * sb.d_sae
        top = 12 * self.cfg.match.top_k * (sa.d_sae + sb.d_sae)
        return Cost(tasks=1, tokens=n, disk=20 * min(sa.d_sae, sb.d_sae) + top,
                    memory=12 * dense + (8 * (sa.l0 + sb.l0) + 8) * n,
                    work={"sparse": n * sa.l0 * sb.l0, "elementwise": CODE_PASSES * dense})

    def _n_pairs(self, la: int, lb: int) -> int:
        return max(1, int(PAIR_SHARE * min(self.saes[("a", la)].d_sae,
                                           self.saes[("b", lb)].d_sae)))

    def _similarity(self, la: int, lb: int) -> Cost:
        sim, n = self.cfg.similarity, self._n_pairs(la, lb)
        d_a, d_b = self.shapes["a"].d_model, self.shapes["b"].d_model
        cost = Cost(tasks=1)
        for name in sim.metrics:
            cost.add(metric_cost(name, n, d_a, d_b, sim.n_perm))
            if METRICS[name].details is not None:  # svcca_fields: its bases twice more
                cost.add(metric_cost(name, n, d_a, d_b, 0, repeats=2))
            if sim.n_halves and n // 2 >= sim.min_pairs:  # the interval's halves, no null
                cost.add(subset_cost(name, n, n // 2, d_a, d_b, sim.n_halves))
        cost.memory = 8 * n * n + 8 * n * (d_a + d_b)  # RSA's two n x n matrices
        return cost

    def _subspaces(self, la: int, lb: int) -> Cost:
        sub, n = self.cfg.subspaces, self._n_pairs(la, lb)
        categories = 8
        n_cat = max(sub.min_pairs, n // categories)
        d_a, d_b = self.shapes["a"].d_model, self.shapes["b"].d_model
        cost = Cost(tasks=1)
        k = svcca_k(n_cat, sub.svcca_k)
        for _ in range(categories):
            for name in sub.metrics:  # the shuffled-pairing null and the random-subset null
                cost.add(metric_cost(name, n_cat, d_a, d_b, sub.n_perm))
                cost.add(subset_cost(name, n, n_cat, d_a, d_b, sub.n_perm, k))
        return cost


def metric_cost(name: str, n: int, d_a: int, d_b: int, n_perm: int, repeats: int = 1) -> Cost:
    """Work of one metric on ``n`` paired rows with an ``n_perm``-draw null, ``repeats``
    times: its one-off decompositions (or Grams) of each side plus each draw's work."""
    k, r = max(1, int(SVCCA_SHARE * min(n, d_a, d_b))), repeats
    if name in ("svcca", "pwcca"):  # the bases: a thin SVD of each side
        once = [Cost(flops=2 * n * d * min(n, d) * r, work={f"svd:{n},{d}": r}) for d in (d_a, d_b)]
    elif name == "procrustes":
        once = [_flop(f"gemm:{n},{d},{min(n, d)}", 2 * n * d * min(n, d) * r) for d in (d_a, d_b)]
    else:  # cka, rsa, mutual_knn: the two sides' n x n Grams
        once = [_flop(f"gemm:{n},{d},{n}", 2 * n * n * d * r) for d in (d_a, d_b)]
    if name in ("svcca", "pwcca", "procrustes"):
        batch = _batch(n_perm, n * k)  # draws side by side in one product
        per_draw = {f"gemm:{k},{n},{batch * k}": 2 * n * k * k,
                    f"gemm:{k * batch},{k},{k}": 2 * k ** 3, f"eig:{k}": 1}
    elif name == "cka" and n * n > d_a * d_b:
        per_draw = {f"gemm:{d_a},{n},{_batch(n_perm, n * d_b) * d_b}": 2 * n * d_a * d_b}
    elif name in ("cka", "rsa"):
        per_draw = {"gather": n * n / 2, "elementwise": n * n}
    else:
        per_draw = {"elementwise": 200 * n}  # neighbour-set overlaps
    cost = Cost()
    for side in once:
        cost.add(side)
    draws = n_perm * repeats
    for op, amount in (per_draw.items() if draws else ()):  # no null: nothing to calibrate
        flops = amount * draws if op.startswith("gemm") else 0.0
        cost.add(Cost(flops=flops, work={op: amount * draws}))
    return cost


def subset_cost(name: str, pool: int, m: int, d_a: int, d_b: int, n_draws: int,
                k: int | None = None) -> Cost:
    """Work of ``n_draws`` random subsets of ``m`` of ``pool`` pairs (``subset_null``).

    The metrics with batched draws (``Metric.subsets``: CKA, RSA, SVCCA with a fixed ``k``)
    read them off each side's pool x pool Gram, formed once: per draw SVCCA finds the
    eigenvectors of both m x m centred sub-Grams and one k x k eigenvalue problem, CKA and
    RSA gather and pass over (RSA: rank) the sub-Grams. Other metrics score each draw in
    full.
    """
    if METRICS[name].subsets is None or (name == "svcca" and not k):
        return metric_cost(name, m, d_a, d_b, 0, repeats=n_draws)
    cost = Cost()
    for d in (d_a, d_b):
        cost.add(_flop(f"gemm:{pool},{d},{pool}", 2 * pool * pool * d))
    if name == "svcca":
        cost.add(Cost(work={f"eigh:{m}": 2 * n_draws, f"eig:{k}": n_draws}))
    else:
        passes = 2 * max(1.0, math.log2(m)) if name == "rsa" else 2
        cost.add(Cost(work={"gather": 2 * m * m * n_draws,
                            "elementwise": passes * m * m * n_draws}))
    return cost


def _batch(n_perm: int, elements: int) -> int:
    """Draws the nulls put side by side in one product (``nulls.permuted_products``)."""
    return max(1, min(n_perm, BLOCK_BYTES // (4 * elements)))


def _controls(cfg) -> list:
    sim = cfg.similarity
    out = []
    if sim.ceiling:
        planner = Planner(cfg)
        out += [c for s in "ab" if (c := twin_config(cfg, s, planner.used[s])) is not None]
    if sim.control:
        out.append(floor_config(cfg))
    return out


def plan(configs) -> dict[str, Cost]:
    """Stage name -> the cost of its units, for a config or a list of configs (a ladder's
    pairs); the controls' own units count in the convergence stage."""
    configs = configs if isinstance(configs, (list, tuple)) else [configs]
    units: dict[tuple[str, str], Cost] = {}
    for cfg in configs:
        units.update(Planner(cfg).units())
    seen = {key for _, key in units}
    for cfg in configs:
        for control in _controls(cfg):
            for (_, key), cost in Planner(control).units().items():
                if key not in seen:
                    seen.add(key)
                    units[("convergence", key)] = cost
    out = {s.name: Cost() for s in stages.STAGES}
    for (stage, _), cost in units.items():
        out[stage].add(cost)
    return out


def grid_counts(cfg) -> tuple[int, int]:
    """(layer pairs, SAEs) of a config, for the plan's header."""
    p = Planner(cfg)
    return len(p.pairs), len(p.saes)


def human(n: float, unit: str = "") -> str:
    """``n`` with a k/M/G/T/P prefix (1,000-based), e.g. ``3.2 G``."""
    if n == 0:
        return f"0 {unit}".strip()
    exp = min(5, max(0, int(math.log10(abs(n)) // 3)))
    return f"{n / 1000 ** exp:.3g} {' kMGTP'[exp].strip()}{unit}".strip()
